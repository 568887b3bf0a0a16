"""The scheduler without a model: token budgets, chunked prefill, sequence slots, preemption, prefix
waits and forks, over a real BlockManager with blocks of 4 tokens."""

from __future__ import annotations

from serving.config import EngineConfig
from serving.engine.block_manager import BlockManager
from serving.engine.scheduler import Scheduler
from serving.engine.sequence import SeqStatus, Sequence
from tests.scheduling import SAMPLED_TOKEN, chunks, name, new_request, sibling, step, tokens

BLOCK = 4


def make(num_blocks: int, pipeline_depth: int = 1, **engine) -> Scheduler:
    config = EngineConfig(block_size=BLOCK, **engine)
    return Scheduler(BlockManager(num_blocks, BLOCK, config.enable_prefix_caching), config, pipeline_depth)


def add(scheduler: Scheduler, *seqs: Sequence) -> None:
    for seq in seqs:
        scheduler.add(seq)


def waiting(scheduler: Scheduler) -> list[str]:
    return [name(seq) for seq in scheduler.waiting]


def test_decodes_go_first_and_a_long_prompt_takes_the_rest_of_the_budget_in_chunks():
    scheduler = make(64, max_num_batched_tokens=16)
    add(scheduler, new_request("a", tokens(0, 3)), new_request("b", tokens(100, 5)))
    first = step(scheduler)
    assert first.chunks == [("a", 3), ("b", 5)] and first.sampled == ["a", "b"]
    c = new_request("c", tokens(200, 40))
    add(scheduler, c)
    steps = [step(scheduler) for _ in range(3)]
    assert [s.chunks for s in steps] == [[("a", 1), ("b", 1), ("c", 14)]] * 2 + [[("a", 1), ("b", 1), ("c", 12)]]
    assert [s.sampled for s in steps] == [["a", "b"], ["a", "b"], ["a", "b", "c"]]  # c samples after its last chunk
    assert c.num_computed_tokens == 40 and c.token_ids == tokens(200, 40) + [SAMPLED_TOKEN]


def test_a_running_prefill_continues_before_a_new_prompt_starts():
    scheduler = make(64, max_num_batched_tokens=16)
    add(scheduler, new_request("a", tokens(0, 40)))
    assert step(scheduler).chunks == [("a", 16)]
    add(scheduler, new_request("b", tokens(100, 20)))
    assert [step(scheduler).chunks for _ in range(4)] == [
        [("a", 16)],
        [("a", 8), ("b", 8)],
        [("a", 1), ("b", 12)],
        [("a", 1), ("b", 1)],
    ]


def test_without_chunked_prefill_a_prompt_waits_for_room_for_all_of_it_and_keeps_its_place():
    scheduler = make(64, max_num_batched_tokens=16, enable_chunked_prefill=False)
    a, b = new_request("a", tokens(0, 10)), new_request("b", tokens(100, 10))
    add(scheduler, a, b)
    assert step(scheduler).chunks == [("a", 10)]  # 6 tokens of budget left: b is not split
    assert step(scheduler).chunks == [("a", 1), ("b", 10)]
    add(scheduler, new_request("c", tokens(200, 40)), new_request("d", tokens(300, 2)))
    assert step(scheduler).chunks == [("a", 1), ("b", 1)]  # d does not overtake c
    assert waiting(scheduler) == ["c", "d"]
    scheduler.finish(a)
    scheduler.finish(b)
    assert step(scheduler).chunks == [("c", 40)]  # longer than the budget: the whole prompt in a step of its own
    assert step(scheduler).chunks == [("c", 1), ("d", 2)]


def test_max_num_seqs_bounds_the_running_batch():
    scheduler = make(64, max_num_seqs=2)
    a = new_request("a", tokens(0, 3))
    add(scheduler, a, new_request("b", tokens(100, 3)), new_request("c", tokens(200, 3)))
    assert step(scheduler).chunks == [("a", 3), ("b", 3)]
    assert step(scheduler).chunks == [("a", 1), ("b", 1)] and waiting(scheduler) == ["c"]
    scheduler.finish(a)
    assert step(scheduler).chunks == [("b", 1), ("c", 3)]


def test_pipelined_steps_take_disjoint_sequences():
    """With 2 stages each step takes half of max_num_seqs, and a sequence whose step is in flight waits for it."""
    scheduler = make(64, pipeline_depth=2, max_num_seqs=4)
    seqs = [new_request(label, tokens(100 * i, 3)) for i, label in enumerate("abcde")]
    add(scheduler, *seqs)
    first = scheduler.schedule()
    scheduler.launched(first)
    second = scheduler.schedule()
    scheduler.launched(second)
    assert chunks(first) == [("a", 3), ("b", 3)] and chunks(second) == [("c", 3), ("d", 3)]
    assert scheduler.schedule().scheduled == []  # all four in flight, and no slot for e
    scheduler.landed(first)
    for seq in seqs[:2]:
        seq.token_ids.append(SAMPLED_TOKEN)
    assert chunks(scheduler.schedule()) == [("a", 1), ("b", 1)]


def test_the_newest_running_sequence_is_preempted_and_later_recomputes_its_prompt_and_output():
    scheduler = make(6, max_num_seqs=3)
    a, b, c = (new_request(label, tokens(100 * i, 7)) for i, label in enumerate("abc"))
    add(scheduler, a, b, c, new_request("d", tokens(300, 3)))
    assert step(scheduler).chunks == [("a", 7), ("b", 7), ("c", 7)]  # two blocks each: all six
    assert step(scheduler).chunks == [("a", 1), ("b", 1), ("c", 1)]  # the 8th token fits in the second block
    c_blocks = list(c.block_table)

    assert step(scheduler).chunks == [("a", 1), ("b", 1)]  # a and b need a third block: c goes
    assert scheduler.num_preemptions == 1
    assert c.status is SeqStatus.WAITING and c.block_table == [] and c.num_computed_tokens == 0
    assert c.token_ids == tokens(200, 7) + [SAMPLED_TOKEN] * 2  # its output so far is kept, to be recomputed
    assert waiting(scheduler) == ["c", "d"]  # back at the front, ahead of later arrivals
    assert sorted(a.block_table[2:] + b.block_table[2:]) == sorted(c_blocks)

    assert step(scheduler).chunks == [("a", 1), ("b", 1)]  # no room for c's three blocks yet
    scheduler.finish(a)
    readmitted = step(scheduler)
    assert readmitted.chunks == [("b", 1), ("c", 9)] and readmitted.sampled == ["b", "c"]
    assert waiting(scheduler) == ["d"]


def test_a_sequence_that_is_itself_the_newest_preempts_itself_not_an_older_one():
    scheduler = make(4)
    a, b = new_request("a", tokens(0, 6)), new_request("b", tokens(100, 7))
    add(scheduler, a, b)
    assert step(scheduler).chunks == [("a", 6), ("b", 7)]
    assert step(scheduler).chunks == [("a", 1), ("b", 1)]
    assert step(scheduler).chunks == [("a", 1)]  # b's 9th token needs a fifth block
    assert scheduler.running == [a] and waiting(scheduler) == ["b"] and scheduler.num_preemptions == 1


def test_a_preempted_sequence_keeps_its_full_blocks_in_the_prefix_cache():
    """Its partial block is reused at once; its full blocks stay cached, so it recomputes only the rest."""
    scheduler = make(5)
    a, b = new_request("a", tokens(0, 7)), new_request("b", tokens(100, 9))
    add(scheduler, a, b)
    assert step(scheduler).chunks == [("a", 7), ("b", 9)]
    assert step(scheduler).chunks == [("a", 1), ("b", 1)]
    b_blocks = list(b.block_table)
    assert step(scheduler).chunks == [("a", 1)]  # a needs a third block: b goes
    assert a.block_table[2] == b_blocks[2]
    scheduler.finish(a)
    hits = scheduler.blocks.prefix_hits
    readmitted = step(scheduler)
    assert readmitted.chunks == [("b", 3)] and readmitted.sampled == ["b"]  # prompt token 9 and its 2 output tokens
    assert b.block_table[:2] == b_blocks[:2] and scheduler.blocks.prefix_hits - hits == 8


def test_a_prompt_whose_next_block_is_being_computed_waits_one_step_and_takes_it_from_the_cache():
    scheduler = make(64, max_num_batched_tokens=16)
    a = new_request("a", tokens(0, 20))
    add(scheduler, a)
    assert step(scheduler).chunks == [("a", 16)]  # blocks 1-4 computed, block 5 next
    b = new_request("b", tokens(0, 20) + tokens(500, 4))
    add(scheduler, b, new_request("c", tokens(300, 5)))
    assert step(scheduler).chunks == [("a", 4), ("c", 5)]  # c, which shares nothing, is not held up by b
    assert waiting(scheduler) == ["b"] and b.block_table == []
    hits = scheduler.blocks.prefix_hits
    assert step(scheduler).chunks == [("a", 1), ("c", 1), ("b", 4)]
    assert b.block_table[:5] == a.block_table[:5] and scheduler.blocks.prefix_hits - hits == 20


def test_identical_prompts_arriving_together_compute_their_shared_blocks_once():
    scheduler = make(64)
    first, second = new_request("a", tokens(0, 12)), new_request("b", tokens(0, 12))
    add(scheduler, first, second)
    assert step(scheduler).chunks == [("a", 12)]
    assert step(scheduler).chunks == [("a", 1), ("b", 4)]  # the last token is computed for its logits
    assert second.block_table[:2] == first.block_table[:2] and second.block_table[2] != first.block_table[2]
    assert [scheduler.blocks.ref_counts[block] for block in first.block_table[:3]] == [2, 2, 1]


def test_a_sequence_finished_during_its_step_keeps_its_blocks_until_the_step_lands():
    scheduler = make(8)
    a = new_request("a", tokens(0, 8))
    add(scheduler, a)
    output = scheduler.schedule()
    scheduler.launched(output)
    scheduler.finish(a)  # aborted while the step writes into its blocks
    assert scheduler.running == [] and a.status is SeqStatus.FINISHED
    assert scheduler.blocks.num_free_blocks == 6 and len(a.block_table) == 2
    scheduler.landed(output)
    assert scheduler.blocks.num_free_blocks == 8 and a.block_table == []
    waiting_one = new_request("w", tokens(100, 3))
    add(scheduler, waiting_one)
    scheduler.finish(waiting_one)
    assert waiting(scheduler) == [] and scheduler.schedule().scheduled == []


def test_forked_siblings_run_at_once_and_copy_the_partial_prompt_block_before_their_first_step():
    scheduler = make(16)
    parent = new_request("p", tokens(0, 10), n=3)
    add(scheduler, parent)
    assert step(scheduler).sampled == ["p"]
    children = [sibling(parent, i) for i in (1, 2)]
    copies = []
    for child in children:
        copies.append(scheduler.blocks.fork(parent, child))
        scheduler.add_forked(child, copies[-1])
    first = step(scheduler)
    assert first.chunks == [("p", 1), ("p.1", 1), ("p.2", 1)]
    assert first.block_copies == copies == [(parent.block_table[2], child.block_table[2]) for child in children]
    assert step(scheduler).block_copies == []  # copied once
    tables = [parent.block_table, *(child.block_table for child in children)]
    assert all(table[:2] == parent.block_table[:2] for table in tables)
    assert len({table[2] for table in tables}) == 3  # each writes its own tokens into its own last block
    for seq in [parent, *children]:
        scheduler.finish(seq)
    assert scheduler.blocks.num_free_blocks == 16


def test_a_fork_with_no_block_free_waits_for_one_instead_of_failing():
    scheduler = make(3)
    parent = new_request("p", tokens(0, 10), n=2)  # its prompt fills all three blocks
    add(scheduler, parent)
    assert step(scheduler).sampled == ["p"]
    child = sibling(parent, 1)
    scheduler.add_forked(child, scheduler.blocks.fork(parent, child))
    assert ("p", 1) in step(scheduler).chunks  # the parent goes on decoding into its own last block
    assert not set(parent.block_table[2:]) & set(child.block_table[2:])  # which the child never shares
    scheduler.finish(parent)
    assert step(scheduler).sampled == ["p.1"]
