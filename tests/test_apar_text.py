"""Text recovery from the paragraph tree and its streaming form, on hand-built trees."""

import random

from apar_rt.apar import ControlTokens, banned_tokens, recover_text, settled_text
from apar_rt.core import Branch, FinishReason
from apar_rt.stop_prefixes import StopPrefixes

FORK, CHILD, EOS = 3, 4, 2
VOCAB = {10: "Tips:", 11: "\n1. Sleep", 12: " well.", 13: " Eight hours.", 14: "\n2. Eat", 15: " greens.",
         16: " Daily.", 17: "\n3. Walk", 18: " Far.", 19: " Slowly."}
CTRL = ControlTokens(FORK, CHILD)
SPECIAL = frozenset({FORK, CHILD, EOS})


def decode(ids):
    return "".join(VOCAB.get(t, "") for t in ids)


def tree(finished=True):
    """Root: 'Tips:' item1 [F] item2 [F] item3 EOS; child of item1 has its own child."""
    prompt = [1]
    root = Branch(0, None, None, 0, prompt, [10, 11, FORK, 14, FORK, 17, 18, EOS])
    c1 = Branch(1, 0, 2, 1, prompt + root.token_ids[:3], [CHILD, 12, FORK, 13, EOS])
    c2 = Branch(2, 0, 4, 1, prompt + root.token_ids[:5], [CHILD, 15, EOS])
    c3 = Branch(3, 1, 2, 2, c1.child_prefix(3), [CHILD, 16, EOS])
    bs = [root, c1, c2, c3]
    if finished:
        for b in bs:
            b.finish_reason = FinishReason.STOP
    return bs


def test_reading_order_is_own_text_then_child_then_continuation():
    assert recover_text(decode, tree(), CTRL, SPECIAL) == \
        "Tips:\n1. Sleep well. Daily. Eight hours.\n2. Eat greens.\n3. Walk Far."


def test_stop_string_cuts_only_its_branch():
    bs = tree()
    bs[2].stop_text_len = len(" gre")
    assert recover_text(decode, bs, CTRL, SPECIAL) == \
        "Tips:\n1. Sleep well. Daily. Eight hours.\n2. Eat gre\n3. Walk Far."


def test_a_stop_string_at_a_fork_keeps_the_child_and_one_before_it_drops_it():
    """The root's own text is 'Tips:\n1. Sleep' [Fork] '\n2. Eat' ...: a stop string that begins
    where the root resumes after its first fork cuts the root there but keeps the child, whose
    text comes first in reading order; one that begins before the fork drops the child."""
    bs = tree()
    at_fork = len("Tips:\n1. Sleep")
    bs[0].stop_text_len = at_fork
    assert recover_text(decode, bs, CTRL, SPECIAL) == "Tips:\n1. Sleep well. Daily. Eight hours."
    bs[0].stop_text_len = at_fork - 1
    assert recover_text(decode, bs, CTRL, SPECIAL) == "Tips:\n1. Slee"


def test_settled_text_holds_a_fork_that_a_partial_match_reaches_across():
    """While the root runs, a stop string that may still complete across its first fork ('ep' +
    [Fork] + '\n2...') may still drop that fork's child: the child is not settled, nor the
    root's text from where the match begins. One that could only begin at the fork leaves the
    child settled. Streaming settled_text's growth gives the final text in both cases."""
    bs = tree()
    for b in bs[1:]:
        b.finish_reason = FinishReason.STOP
    bs[0].finish_reason = None
    bs[0].token_ids = bs[0].token_ids[:3]          # 'Tips:', '\n1. Sleep', [Fork]: the root waits there
    assert settled_text(decode, bs, CTRL, SPECIAL, stops=("ep\n2",)) == "Tips:\n1. Sle"
    assert settled_text(decode, bs, CTRL, SPECIAL, stops=("\n2. E",)) == \
        "Tips:\n1. Sleep well. Daily. Eight hours."
    full = tree()[0].token_ids
    for stops, final in ((("ep\n2",), "Tips:\n1. Sle"),
                         (("\n2. E",), "Tips:\n1. Sleep well. Daily. Eight hours.")):
        grown = []
        for n in range(3, len(full) + 1):   # the root grows until its text holds the stop string
            bs[0].token_ids = full[:n]
            own = decode(bs[0].token_ids)
            if stops[0] in own:
                bs[0].finish_reason, bs[0].stop_text_len = FinishReason.STOP, own.find(stops[0])
                break
            grown.append(settled_text(decode, bs, CTRL, SPECIAL, stops=stops))
        assert recover_text(decode, bs, CTRL, SPECIAL) == final
        assert all(final.startswith(g) for g in grown), (stops, grown, final)
        bs[0].finish_reason, bs[0].stop_text_len = None, None


def test_a_running_branch_a_stop_string_dropped_still_holds_what_follows_under_a_budget():
    """c1's stop string (' we|ll.') drops c3, its child, from the text, but c3's tokens still count
    in the max_tokens budget: while c3 runs, the root's continuation after c1 may still lose
    tokens to it, so it is not settled (it was streamed, then cut from the final text)."""
    bs = tree()
    c1, c3 = bs[1], bs[3]
    c1.stop_text_len = len(" we")
    c3.finish_reason, c3.token_ids = None, [CHILD, 16]
    assert settled_text(decode, bs, CTRL, SPECIAL, budget=12) == "Tips:\n1. Sleep we"
    assert settled_text(decode, bs, CTRL, SPECIAL) == "Tips:\n1. Sleep we\n2. Eat greens.\n3. Walk Far."
    c3.finish_reason, c3.token_ids = FinishReason.LENGTH, [CHILD, 16, 16, 16]
    assert recover_text(decode, bs, CTRL, SPECIAL, budget=12) == "Tips:\n1. Sleep we"


def test_a_stream_holds_back_the_longest_partial_match_at_the_end():
    """StopPrefixes.held against its definition (the longest end of the text that is a proper
    prefix of a stop string), and its quiet verdicts against theirs: after text of which nothing
    is held, a quiet token's text leaves nothing held and ends whole."""
    assert StopPrefixes(("urs!",)).held("Eight hours") == 3
    assert StopPrefixes(("s!", "hours, ")).held("Eight hours") == 5     # the longer of two partial matches
    assert StopPrefixes(("hours",)).held("Eight hours") == 0            # complete: it would have cut already
    assert StopPrefixes(("ababc",)).held("abab") == 4 and StopPrefixes(("abx",)).held("aab") == 2
    assert StopPrefixes(("ab",)).held("") == 0 and StopPrefixes(()).held("ab") == 0
    rng = random.Random(0)
    for _ in range(3000):
        stops = ["".join(rng.choices("ab\n", k=rng.randint(1, 5))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choices("ab\n", k=rng.randint(0, 8)))
        want = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        p = StopPrefixes(stops)
        assert p.held(text) == want, (stops, text)
        token = "".join(rng.choices("ab\n\ufffd", k=rng.randint(1, 3)))
        p.quiet_table(8)
        if p.judge(7, token):
            assert p.quiet[7] == 1 and token[-1] != "\ufffd"
            if not want:
                assert p.held(text + token) == 0, (stops, text, token)
        else:
            assert p.quiet[7] == 2


def test_settled_text_stops_at_the_first_running_branch():
    bs = tree(finished=False)
    bs[3].finish_reason = FinishReason.STOP
    # c1 is running: its text so far is settled, nothing after it in reading order.
    assert settled_text(decode, bs, CTRL, SPECIAL) == "Tips:\n1. Sleep well. Daily. Eight hours."
    # a stop string that could still complete holds back its partial match, and only that
    assert settled_text(decode, bs, CTRL, SPECIAL, stops=("rs.!",)) == "Tips:\n1. Sleep well. Daily. Eight hou"
    assert settled_text(decode, bs, CTRL, SPECIAL, stops=("s.x", "hours. ")) == "Tips:\n1. Sleep well. Daily. Eight "
    assert settled_text(decode, bs, CTRL, SPECIAL, stops=("xyz", "rs")) == "Tips:\n1. Sleep well. Daily. Eight hours."
    bs[1].finish_reason = FinishReason.STOP
    assert settled_text(decode, bs, CTRL, SPECIAL) == "Tips:\n1. Sleep well. Daily. Eight hours.\n2. Eat greens."
    for b in bs:
        b.finish_reason = FinishReason.STOP
    assert settled_text(decode, bs, CTRL, SPECIAL) == recover_text(decode, bs, CTRL, SPECIAL)


def test_bans():
    assert banned_tokens(17, 0, CTRL, mode="apar", max_depth=2) == [CHILD]
    assert banned_tokens(17, 0, CTRL, mode="ar", max_depth=2) == [CHILD, FORK]
    assert banned_tokens(CHILD, 1, CTRL, mode="apar", max_depth=2) == [CHILD, FORK]
    assert banned_tokens(FORK, 0, CTRL, mode="apar", max_depth=2) == [CHILD, FORK]
    assert banned_tokens(16, 2, CTRL, mode="apar", max_depth=2) == [CHILD, FORK]
    assert banned_tokens(16, 2, CTRL, mode="apar", max_depth=3) == [CHILD]
    assert banned_tokens(17, 0, CTRL, mode="apar", max_depth=2, step_full=True) == [CHILD, FORK]
    assert banned_tokens(17, 0, ControlTokens(None, None), mode="apar", max_depth=2) == []


def test_reference_join_applies_thudm_newline_fixups():
    """A detail after a numbered item starts a line; a continuation after a child starts a paragraph."""
    assert recover_text(decode, tree(), CTRL, SPECIAL, join="reference") == (
        "Tips:\n1. Sleep\n well. Daily.\n\n Eight hours.\n\n2. Eat\n greens.\n\n3. Walk Far.")


def test_reference_join_streams_a_prefix_of_its_final_text():
    bs = tree(finished=False)
    final = recover_text(decode, tree(), CTRL, SPECIAL, join="reference")
    seen = []
    for order in ([3], [1], [2], [0]):
        for i in order:
            bs[i].finish_reason = FinishReason.STOP
        seen.append(settled_text(decode, bs, CTRL, SPECIAL, join="reference"))
    assert all(final.startswith(s) for s in seen) and seen[-1] == final


def test_a_child_wholly_past_the_budget_is_not_in_the_text():
    """A budget that ends at a [Fork] (the root's second, 13th token in reading order): whether
    that fork's child was started first depends on the schedule (a branch earlier in reading
    order may grow after the fork), so the text, final and settled, is the same with the child
    (all its tokens past the budget) and without it. The reference join once put its paragraph
    break after the fork in only when the child existed."""
    for join in ("inplace", "reference"):
        with_child = tree()
        without = [b for b in tree() if b.id != 2]
        want = recover_text(decode, without, CTRL, SPECIAL, join=join, budget=13)
        assert want.endswith("Eat") and "greens" not in want
        assert recover_text(decode, with_child, CTRL, SPECIAL, join=join, budget=13) == want
        with_child[2].finish_reason = None   # the child still runs, past the budget
        assert settled_text(decode, with_child, CTRL, SPECIAL, join=join, budget=13) == want


def _stream(final, schedule, budget, join):
    """The reading-order stream of `final`'s tree grown in `schedule` ((branch id, tokens) at a
    time; a [Fork] that `final` gives a child makes it then, holding [Child], as the engine
    does: the schedule makes them in `final`'s id order), every branch then finished. Returns
    the text sent, recover_text of what was grown, and whether the stream diverged."""
    from apar_rt.core import BranchDelta, Request, SamplingParams
    from apar_rt.detokenizer import TreeText
    from apar_rt.serve.streamer import ReadingOrderStreamer

    req = Request("r", "", [1], SamplingParams(max_tokens=budget))
    req.budget = budget
    st = ReadingOrderStreamer(req, TreeText(decode, SPECIAL), CTRL, SPECIAL, join=join)
    kids = {(b.parent, b.fork_index): b for b in final if b.parent is not None}
    sent = []
    for bid, n in schedule:
        b = req.branches[bid]
        deltas = [BranchDelta(b.id, b.parent, b.fork_index, [], False)]
        for t in final[bid].token_ids[len(b.token_ids):len(b.token_ids) + n]:
            b.token_ids.append(t)
            deltas[0].new_token_ids.append(t)
            kid = kids.get((b.id, len(b.token_ids) - 1))
            if t == FORK and kid is not None:
                c = Branch(kid.id, b.id, kid.fork_index, b.depth + 1, b.child_prefix(len(b.token_ids)), [CHILD])
                req.branches.append(c)
                b.children.append(c.id)
                req.forks += 1
                req.num_live += 1
                deltas.append(BranchDelta(c.id, b.id, c.fork_index, [CHILD], False))
        sent.append(st.step(deltas))
    for b in req.branches:
        b.finish_reason = FinishReason.STOP
    req.num_live = 0
    text = recover_text(decode, req.branches, CTRL, SPECIAL, join=join, budget=budget)
    return "".join(sent) + st.finish(text), text, st.diverged


def test_a_stream_ends_at_a_fork_whose_child_is_past_the_budget():
    """The budget (3) ends at the root's first [Fork], after '1. ': the reference join would put a
    line break before that fork's child, which is past the budget and so not in the text. The
    stream must not send it either."""
    final = tree()
    for join in ("inplace", "reference"):
        streamed, text, diverged = _stream(final, [(0, 3), (0, 2), (1, 2), (0, 3), (1, 2), (2, 2), (3, 2)], 3, join)
        assert text == "Tips:\n1. Sleep" and streamed == text and not diverged


def test_context_slice_equals_slicing_the_context():
    b = Branch(0, None, None, 0, [1, 2, 3, 4], [5, 6, 7])
    ctx = b.context()
    assert all(b.context_slice(s, e) == ctx[s:e] for s in range(8) for e in range(s, 9))
