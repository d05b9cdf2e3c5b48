"""A dict with a size limit, for what the operator remembers per client, token or stage."""

from __future__ import annotations

from collections import OrderedDict


class Recent(OrderedDict):
    """At most `size` entries: setting one past that drops the least recently set or touched."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)

    def touch(self, key, default=None):
        """The value (marked as just used), or `default`."""
        if key in self:
            self.move_to_end(key)
            return self[key]
        return default
