"""alignment-operator: AlignmentRun resources reconciled into training Jobs."""

__version__ = "0.1.0"
