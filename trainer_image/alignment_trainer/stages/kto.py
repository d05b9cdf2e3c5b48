"""KTO: unpaired preference optimisation on prompt/completion/label rows (label: desirable?).

    python -m alignment_trainer recipe.yaml          # recipe.method: kto

trl.KTOTrainer against a frozen reference (the starting model, recipe.ref_model, or the
adapter-disabled base under LoRA). KTO's reference point z0 is a KL estimate from mismatched
pairs: TRL pairs each row's prompt with the completion of the row before it in its batch of
per_device_train_batch_size rows (the first with the last), and reads the rows in order. Rows
made from preference pairs come two by two (chosen, rejected) for one prompt, so in their
given order half the KL pairs would be a real reply to their own prompt. `kl_order` shuffles the
rows with the seed (a mixture's sources interleave) and then arranges each batch so that no
row's KL completion comes from a row with the same prompt; each epoch then reads those batches
in a new seeded order (KLBatchOrder). The held-out rows are arranged the same way: TRL pairs them
in blocks of per_device_train_batch_size too, for the eval KL and loss. per_device_train_batch_size
must be at least 2 (TRL refuses 1).
"""

from __future__ import annotations

import heapq
import json
import logging
import random
import time
from collections import Counter

import torch
from trl import KTOConfig, KTOTrainer

from .. import refcache
from ..data import load_stage_data
from ..model import added_tokens, load_model, load_tokenizer, lora_config
from ..recipe import Recipe
from ..tokens import CompletionEndsAtEndOfTurn
from ..training import (_prompt_length, build_config, finish_stage, free_reference, load_reference, reference_cache,
                        setup_stage, train, truncate_prompts)

log = logging.getLogger("alignment_trainer")
LOOKAHEAD = 4096  # rows searched for one that fits a batch slot before accepting a same-prompt KL pair


def build(recipe: Recipe):
    """The stage's KTOTrainer: data, config, model, reference, ordered rows (run() trains it)."""
    t = recipe.training

    # Data first: a bad dataset fails in seconds, before a 7B model downloads or loads.
    data = load_stage_data(recipe)

    # Training config first: under ZeRO-3 it makes from_pretrained load the weights sharded.
    args = build_config(KTOConfig, recipe, beta=t.beta, loss_type=recipe.effective_loss_type,
                        precompute_ref_log_probs=t.precompute_ref_log_probs)

    # Model & tokenizer; the reference as in DPO (training.load_reference)
    tokenizer = load_tokenizer(recipe.model)
    model = load_model(recipe.model, tokenizer, lora=recipe.lora, trainable=True)
    peft_config = lora_config(recipe.lora, added_tokens(recipe.model, tokenizer)) if recipe.lora else None
    ref_model = load_reference(recipe, tokenizer)

    # Data: prompt (messages), completion ([assistant message]), label (bool), in KL order
    train_set = truncate_prompts(data["train"], tokenizer, t.max_prompt_length)
    test_set = truncate_prompts(data.get("test"), tokenizer, t.max_prompt_length)
    if recipe.effective_loss_type != "apo_zero_unpaired":  # the losses that estimate a KL term
        # TRL pairs the held-out rows in blocks of per_device_train_batch_size too (its eval KL and loss)
        train_set = kl_order(train_set, tokenizer, t.per_device_train_batch_size, t.seed, t.max_length)
        test_set = kl_order(test_set, tokenizer, t.per_device_train_batch_size, t.seed, t.max_length, "held-out")
    if t.precompute_ref_log_probs:  # one log-prob cache all processes share
        train_set = reference_cache(train_set, recipe, tokenizer, "train")
        test_set = reference_cache(test_set, recipe, tokenizer, "test")

    # Trainer (it precomputes the reference log-probs here, when asked)
    start = time.perf_counter()
    trainer = KLBatchKTOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=train_set,
                                eval_dataset=test_set, processing_class=tokenizer, peft_config=peft_config,
                                reference_keys=refcache.reference_keys(recipe, train_set, test_set))
    trainer.reference_pass = refcache.reference_pass(trainer, time.perf_counter() - start)  # into result.json
    free_reference(trainer, recipe)
    return trainer, tokenizer


def run(recipe: Recipe) -> dict | None:
    # Setup: a stage that already finished is not trained again.
    done = setup_stage(recipe)
    if done is not None:
        return done
    trainer, tokenizer = build(recipe)

    # Train, resuming from the newest complete checkpoint
    train_output = train(trainer, recipe)

    # Save final/ (a LoRA adapter merged into a standalone model when lora.merge) and the results
    return finish_stage(trainer, recipe, tokenizer, train_output, extra=trainer.reference_pass)


# ---------------------------------------------------------------------------- KL pairing order

class KLBatchOrder(torch.utils.data.Sampler):
    """Row indices in whole batches of `batch_size` (the blocks TRL paired KL completions in), the
    blocks in a new seeded order each epoch (transformers calls set_epoch). A short last block
    stays last, so every other block still starts on a batch boundary."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        starts = list(range(0, self.n, self.batch_size))
        short = [starts.pop()] if self.n % self.batch_size else []
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(starts)
        for start in starts + short:
            yield from range(start, min(start + self.batch_size, self.n))


class KLBatchKTOTrainer(CompletionEndsAtEndOfTurn, refcache.CachedReference, KTOTrainer):
    """KTOTrainer reading its KL batches in a new order each epoch (TRL reads them sequentially);
    its precomputed reference log-probs are kept in the shared cache (refcache.CachedReference);
    completions scored through their end-of-turn token (tokens.CompletionEndsAtEndOfTurn)."""

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.calculate_KL or dataset is None:
            return super()._get_train_sampler(train_dataset)
        return KLBatchOrder(len(dataset), self.args.per_device_train_batch_size, self.args.seed)


def kl_order(dataset, tokenizer, batch_size: int, seed: int, max_length: int | None, split: str = "train"):
    """Rows shuffled with `seed`, then placed so that within each batch of `batch_size` no row
    follows one with the same prompt (nor the batch's first row its last): TRL's rotation then
    gives every row a KL completion written for another prompt. The held-out split too (`split`
    names it in the warnings): TRL builds its KL pairs the same way, for its eval KL and loss.

    Rows TRL would drop (a prompt that alone fills max_length) are dropped here first, so its
    filter does not shift the batches this order was made for.
    """
    if dataset is None:
        return None
    prompts = dataset["prompt"]
    keep = list(range(len(prompts)))
    if max_length is not None:
        keep = [i for i in keep if _prompt_length(tokenizer, prompts[i]) < max_length]
        if len(keep) < len(prompts):
            log.warning("kto: %d %s rows dropped, their prompt alone fills training.max_length %d",
                        len(prompts) - len(keep), split, max_length)
    keys = {i: json.dumps(prompts[i], sort_keys=True) for i in keep}
    random.Random(seed).shuffle(keep)
    order, clashes = arrange(keep, keys.__getitem__, batch_size)
    if len(order) < len(keep):
        log.warning("kto: one %s row left out: a last batch of one row would be its own KL pair", split)
    if clashes:
        log.warning("kto: %d of %d %s rows get a KL completion from their own prompt (one prompt holds too many "
                    "rows to separate them within batches of %d)", clashes, len(order), split, batch_size)
    return dataset.select(order)


def arrange(pool: list, key, batch_size: int) -> tuple[list, int]:
    """`pool` reordered so no two neighbours in a batch share a key (cyclically: the first row
    takes its KL completion from the last); returns (order, rows that could not be separated).

    Greedy: each slot takes the nearest row in `pool` order whose key fits, which keeps the
    shuffle's randomness, except when one key holds half the rows still to place: then a row of
    that key goes first, or the end would hold nothing but it.
    """
    pool = list(pool)
    counts = Counter(key(row) for row in pool)
    heap = [(-n, k) for k, n in counts.items()]
    heapq.heapify(heap)
    order: list = []
    clashes = 0
    while pool:
        size = min(batch_size, len(pool))
        batch: list = []
        for slot in range(size):
            avoid = set()
            if batch:
                avoid.add(key(batch[-1]))
            if slot == size - 1 and size > 1:
                avoid.add(key(batch[0]))
            while heap and -heap[0][0] != counts[heap[0][1]]:  # drop stale counts
                heapq.heappop(heap)
            top = heap[0][1] if heap else None
            if top is not None and 2 * counts[top] >= len(pool) and top not in avoid:
                fits = lambda k: k == top  # noqa: E731 - the crowded key first
            else:
                fits = lambda k: k not in avoid  # noqa: E731
            pick = next((j for j, row in enumerate(pool[:LOOKAHEAD]) if fits(key(row))), None)
            if pick is None:
                pick, clashes = 0, clashes + 1
            row = pool.pop(pick)
            counts[key(row)] -= 1
            heapq.heappush(heap, (-counts[key(row)], key(row)))
            batch.append(row)
        order += batch
    if len(order) > 1 and len(order) % batch_size == 1:
        order.pop()  # a last batch of one row would be its own KL pair: leave that row out
    if clashes:  # the greedy pass ran into a corner near the end: swap rows between batches
        clashes = separate(order, key, batch_size)
    return order, clashes


def separate(order: list, key, batch_size: int) -> int:
    """Swaps (in place) that remove rows taking their KL completion from their own key: each such
    row is swapped with the first row elsewhere whose exchange lowers the clashes of both batches.
    Returns the clashes left (rows whose key equals their predecessor's in the batch, cyclically)."""
    def start(i: int) -> int:
        return i - i % batch_size

    def cost(first: int) -> int:
        keys = [key(row) for row in order[first:first + batch_size]]
        return sum(keys[i] == keys[i - 1] for i in range(len(keys))) if len(keys) > 1 else 0

    for i in range(len(order)):
        first = start(i)
        block = order[first:first + batch_size]
        if len(block) < 2 or key(order[i]) != key(block[(i - first) - 1]):
            continue
        for j in range(len(order)):
            other = start(j)
            if other == first:
                continue
            before = cost(first) + cost(other)
            order[i], order[j] = order[j], order[i]
            if cost(first) + cost(other) < before:
                break
            order[i], order[j] = order[j], order[i]
    return sum(cost(first) for first in range(0, len(order), batch_size))
