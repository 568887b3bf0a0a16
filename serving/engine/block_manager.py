"""Paged KV cache bookkeeping: block allocation, reference counts and prefix caching.

A sequence owns a block table (a list of block ids). Blocks full of computed tokens are named
by a hash chained over all tokens up to and including the block, so a later sequence with the
same prefix can take them instead of recomputing. Freed blocks with a hash stay reusable until
memory is needed, then the least recently freed is evicted first. Prompt blocks that a running
sequence is still computing are "computing blocks": a new prompt that needs one waits a step for it
rather than computing it a second time.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque

from serving.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[bytes | None] = [None] * num_blocks
        self.cached_blocks: dict[bytes, int] = {}
        self.empty: deque[int] = deque(range(num_blocks))  # free and holding nothing reusable
        self.evictable: OrderedDict[int, None] = OrderedDict()  # free but hashed, oldest first
        self.computing_blocks: dict[bytes, Sequence] = {}  # hash of a prompt block a step is computing -> its sequence
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found

    @property
    def num_free_blocks(self) -> int:
        return len(self.empty) + len(self.evictable)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live sequences (0..1)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, seq: Sequence) -> bool:
        """Give a new sequence the cached blocks of its longest known prefix.

        Returns False (taking nothing) when the next block is being computed by another sequence:
        the caller should retry next step, when that block will be cached.
        """
        if not self.enable_prefix_caching or seq.request.params.prompt_logprobs is not None:
            return True
        # at least one token must be computed, so that the step produces logits
        hashes = self._prompt_block_hashes(seq)[: (len(seq.token_ids) - 1) // self.block_size]
        cached = 0
        while cached < len(hashes) and hashes[cached] in self.cached_blocks:
            cached += 1
        if cached < len(hashes) and hashes[cached] in self.computing_blocks:
            return False
        for block_hash in hashes[:cached]:
            block = self.cached_blocks[block_hash]
            self._take(block)
            seq.block_table.append(block)
            seq.block_hashes.append(block_hash)
        seq.num_computed_tokens = cached * self.block_size
        self.prefix_queries += len(seq.token_ids)
        self.prefix_hits += seq.num_computed_tokens
        return True

    def mark_computing(self, seq: Sequence) -> None:
        """Record the admitted sequence's uncached prompt blocks as being computed by it."""
        if self.enable_prefix_caching:
            for block_hash in self._prompt_block_hashes(seq)[len(seq.block_hashes) :]:
                self.computing_blocks.setdefault(block_hash, seq)

    def _prompt_block_hashes(self, seq: Sequence) -> list[bytes]:
        if seq.prompt_block_hashes is None:
            hashes, parent = [], b""
            for i in range(seq.num_prompt_tokens // self.block_size):
                parent = self._hash(parent, seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
                hashes.append(parent)
            seq.prompt_block_hashes = hashes
        return seq.prompt_block_hashes

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Make the block table cover `num_new_tokens` more tokens; False if memory is short."""
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if needed > self.num_free_blocks:
            return False
        for _ in range(needed):
            block = self.empty.popleft() if self.empty else self._evict()
            self.ref_counts[block] = 1
            seq.block_table.append(block)
        return True

    def register_computed(self, seq: Sequence) -> None:
        """Hash the blocks that became full of computed tokens so later prompts can reuse them."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        while len(seq.block_hashes) < num_full:
            i = len(seq.block_hashes)
            prompt_hashes = self._prompt_block_hashes(seq)
            if i < len(prompt_hashes):
                block_hash = prompt_hashes[i]
            else:
                parent = seq.block_hashes[-1] if seq.block_hashes else b""
                block_hash = self._hash(parent, seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            seq.block_hashes.append(block_hash)
            if self.computing_blocks.get(block_hash) is seq:
                del self.computing_blocks[block_hash]
            block = seq.block_table[i]
            if block_hash not in self.cached_blocks and self.block_hashes[block] is None:
                self.cached_blocks[block_hash] = block
                self.block_hashes[block] = block_hash

    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int] | None:
        """Share the parent's full blocks with a child; returns a (src, dst) block copy for a partial tail."""
        num_full = parent.num_computed_tokens // self.block_size
        for block in parent.block_table[:num_full]:
            self.ref_counts[block] += 1
        child.block_table = parent.block_table[:num_full]
        child.block_hashes = list(parent.block_hashes[:num_full])
        child.num_computed_tokens = parent.num_computed_tokens
        if num_full == len(parent.block_table):
            return None
        if not self.allocate_slots(child, 0):  # no block for a copy: the child computes its partial tail itself
            child.num_computed_tokens = num_full * self.block_size
            return None
        return parent.block_table[num_full], child.block_table[-1]

    def free(self, seq: Sequence) -> None:
        for block_hash in seq.prompt_block_hashes or ():
            if self.computing_blocks.get(block_hash) is seq:
                del self.computing_blocks[block_hash]
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if self.block_hashes[block] is None:
                    self.empty.appendleft(block)
                else:
                    self.evictable[block] = None
        seq.block_table = []
        seq.block_hashes = []

    def _take(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.evictable[block]
        self.ref_counts[block] += 1

    def _evict(self) -> int:
        block, _ = self.evictable.popitem(last=False)
        del self.cached_blocks[self.block_hashes[block]]
        self.block_hashes[block] = None
        return block

    @staticmethod
    def _hash(parent: bytes, tokens: list[int]) -> bytes:
        return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()
