"""Incremental text (detokenizer.TreeText, the streamer, Engine.finalize) against a full re-render.

The oracle is apar.py's text contract computed from scratch each time with a plain decode per
segment (`recover_text` / `settled_text` without a segment cache): the incremental text must equal
it at every step, on random trees with forks, stop-string cuts and max_tokens cuts, on tokens that
split multi-byte UTF-8 characters (the demo byte-level BPE, a sentencepiece-style byte-fallback
tokenizer), and its decode work per step must not grow with the generated length.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest

from apar_rt.apar import ControlTokens, continuation_text, recover_text, segment_text, settled_text
from apar_rt.core import Branch, BranchDelta, FinishReason, Request, SamplingParams
from apar_rt.detokenizer import MAX_CHAR_TOKENS, REBASE, REPLACEMENT, SegmentText, TreeText
from apar_rt.serve.streamer import ReadingOrderStreamer

DEMO = Path(__file__).resolve().parents[1] / "samples" / "models" / "apar-tiny"
MULTIBYTE = "héllo wörld €100 日本語の文 😀🎉 naïve café ñandú 1. Ünïcödé — “quoted” ½ ✓"


class Counting:
    """A decode that counts the tokens it is given."""

    def __init__(self, decode):
        self.decode = decode
        self.tokens = 0
        self.calls = 0

    def __call__(self, ids):
        self.tokens += len(ids)
        self.calls += 1
        return self.decode(ids)


# ---- tokenizers -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo():
    """The demo model's byte-level BPE: (decode, ids of [Fork], [Child], EOS, special ids, token pool)."""
    from apar_rt.model.tokenizer import control_tokens, load_tokenizer

    tok = load_tokenizer(DEMO)
    ctrl = control_tokens(tok)
    special = frozenset(tok.all_special_ids) | frozenset(ctrl.ids)
    # tokens of text with multi-byte characters (the BPE splits many into byte tokens) and random ids
    split = [t for t in tok.encode(MULTIBYTE * 3, add_special_tokens=False) if t not in special]
    ordinary = [t for t in range(len(tok)) if t not in special]
    return (lambda ids: tok.decode(ids, skip_special_tokens=True)), ctrl, tok.eos_token_id, special, split, ordinary


def small_tokenizer(pieces: list[str], model, decoder, split=None):
    """A `tokenizers` tokenizer over `pieces`, whose first five are special (unknown, BOS, EOS,
    [Fork], [Child]), as the fixtures' tuple: (decode, control ids, EOS id, special ids, token runs
    for `draw` (default: the ordinary ids), the ordinary ids). `model` makes the model from the
    vocabulary; `split(vocab)` makes the token runs."""
    from tokenizers import AddedToken, Tokenizer

    vocab = {p: i for i, p in enumerate(pieces)}
    tok = Tokenizer(model(vocab))
    tok.decoder = decoder
    tok.add_special_tokens([AddedToken(p, special=True) for p in pieces[:5]])
    ordinary = list(range(5, len(pieces)))
    ctrl = ControlTokens(vocab[pieces[3]], vocab[pieces[4]])
    return ((lambda ids: tok.decode(ids, skip_special_tokens=True)), ctrl, vocab[pieces[2]], frozenset(range(5)),
            ordinary if split is None else split(vocab), ordinary)


@pytest.fixture(scope="module")
def demo_bytes(demo):
    """The demo tokenizer with the code under test reading its byte table (ByteSegmentText); the
    oracle still decodes with the tokenizer."""
    return demo


def byte_table_of(which: str):
    """The byte table the code under test uses for fixture `which` (None: it decodes)."""
    from apar_rt.model.byte_table import byte_table
    from apar_rt.model.tokenizer import load_tokenizer

    if which != "demo_bytes":
        return None
    if "demo" not in _TABLES:
        _TABLES["demo"] = byte_table(load_tokenizer(DEMO))
    return _TABLES["demo"]


_TABLES: dict = {}


@pytest.fixture(scope="module")
def byte_fallback():
    """A sentencepiece-style tokenizer: '▁' pieces, <0xNN> byte fallback, Fuse and a leading-space Strip."""
    from tokenizers import decoders, models

    pieces = ["<unk>", "<s>", "</s>", "[SplitMask]", "[SplitSop]"] + [f"<0x{i:02X}>" for i in range(256)]
    pieces += ["▁", "▁the", "▁cat", "▁sat", "a", "b", "1.", "2.", ".", "▁é", "▁caf", "é", "▁hello", "▁world"]

    def split(vocab):
        byte = {i: vocab[f"<0x{i:02X}>"] for i in range(256)}
        out = []
        for ch in MULTIBYTE:
            data = ch.encode()
            out += [byte[x] for x in data] if len(data) > 1 else [vocab.get("▁" if ch == " " else ch, byte[data[0]])]
        return out

    return small_tokenizer(
        pieces, lambda vocab: models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True),
        decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                           decoders.Strip(" ", 1, 0)]), split)


@pytest.fixture(scope="module")
def metaspace():
    """A Metaspace tokenizer (a space before each '▁' piece, the first one's dropped), no byte fallback."""
    from tokenizers import decoders, models

    pieces = ["<unk>", "<s>", "</s>", "[SplitMask]", "[SplitSop]", "▁", "▁the", "▁cat", "a", "b", ":", "▁é", "é",
              "日本", "▁wörld", "1.", ".", "!", "'s", "▁:", "😀"]
    return small_tokenizer(pieces, lambda vocab: models.BPE(vocab=vocab, merges=[], unk_token="<unk>"),
                           decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True))


@pytest.fixture(scope="module")
def wordpiece():
    """A WordPiece tokenizer ('##' continuations, a space before the others, clean-up of spaces)."""
    from tokenizers import decoders, models

    pieces = ["[UNK]", "[CLS]", "[SEP]", "[SplitMask]", "[SplitSop]", "the", "cat", "##s", "##ing", "sat", ".", ",",
              "'", "n", "##'t", "do", "not", ":", "é", "##é", "日", "##本", "?"]
    return small_tokenizer(pieces, lambda vocab: models.WordPiece(vocab=vocab, unk_token="[UNK]"),
                           decoders.WordPiece(prefix="##", cleanup=True))


@pytest.fixture(scope="module")
def bpe_suffix():
    """A BPE with end-of-word suffixes (BPEDecoder: '</w>' becomes a space, except on the last token)."""
    from tokenizers import decoders, models

    pieces = ["<unk>", "<s>", "</s>", "[SplitMask]", "[SplitSop]", "the</w>", "ca", "t</w>", "sa", ":</w>", "é",
              "é</w>", "a", "b</w>", ".</w>", "日本</w>", "x", "😀</w>", "1.</w>"]
    return small_tokenizer(
        pieces, lambda vocab: models.BPE(vocab=vocab, merges=[], unk_token="<unk>", end_of_word_suffix="</w>"),
        decoders.BPEDecoder(suffix="</w>"))


def draw(rng, split, ordinary, n):
    """n tokens: runs of text whose multi-byte characters are split over tokens, truncated at random
    (incomplete and invalid UTF-8), mixed with random ids."""
    out = []
    while len(out) < n:
        if rng.random() < 0.6:
            i = int(rng.integers(0, len(split)))
            out += split[i:i + int(rng.integers(1, 8))]
        else:
            out.append(int(rng.choice(ordinary)))
    return out[:n]


# ---- one segment --------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["demo", "demo_bytes", "byte_fallback"])
@pytest.mark.parametrize("seed", range(4))
def test_segment_text_equals_a_full_decode_at_every_length(which, seed, request):
    from apar_rt.detokenizer import open_segment

    decode, ctrl, eos, special, split, ordinary = request.getfixturevalue(which)
    rng = np.random.default_rng(seed)
    context = draw(rng, split, ordinary, 12)
    tokens = draw(rng, split, ordinary, 600)
    b = Branch(0, None, None, 0, context, [])
    count = Counting(decode)
    seg = open_segment(b, 0, count, special, byte_table=byte_table_of(which))
    steps = []
    while len(b.token_ids) < len(tokens):
        before = count.tokens + seg.decoded_tokens * (which == "demo_bytes")
        k = int(rng.integers(1, 4))
        b.token_ids.extend(tokens[len(b.token_ids):len(b.token_ids) + k])
        seg.advance(len(b.token_ids))
        steps.append(count.tokens + seg.decoded_tokens * (which == "demo_bytes") - before)
        want = continuation_text(decode, context, b.token_ids, special)
        assert seg.text() == want
        assert len(seg) == len(want) and seg.stable_len() == len(want.rstrip("\ufffd"))
        a = int(rng.integers(0, len(want) + 1))
        assert seg.slice(a, len(want)) == want[a:]
    if which == "demo":
        # decode work follows the new tokens, not the segment's length (a full decode per step
        # would grow to 600). Byte fallback is not bounded so: its text for a run of byte tokens
        # is all U+FFFD until the run is valid UTF-8 as a whole, so a run is decoded until it ends.
        # A step that commits an incomplete tail's whole part decodes up to MAX_CHAR_TOKENS more
        # windows (at most once per 2 * REBASE tokens).
        q = len(steps) // 4
        assert max(steps) <= (1 + MAX_CHAR_TOKENS) * 3 * REBASE
        assert np.mean(steps[-q:]) <= 1.5 * np.mean(steps[:q]) + 2
    if which == "demo_bytes":   # each new token's bytes are read once, and nothing is decoded
        assert sum(steps) == len(tokens) and count.calls == 0


def test_a_byte_fallback_run_that_turns_invalid_is_decoded_again(byte_fallback):
    """'é' as two byte tokens is text; a third byte token makes the whole run invalid (every byte
    a U+FFFD in the full decode): the kept text must follow, not keep the 'é'."""
    decode, ctrl, eos, special, split, ordinary = byte_fallback
    e_acute = [5 + 0xC3, 5 + 0xA9]
    b = Branch(0, None, None, 0, [split[0]], [])
    seg = SegmentText(decode, b.token_ids, 0, [split[0]])
    for t in [ordinary[-1]] + e_acute + [5 + 0xE2, 5 + 0x41]:
        b.token_ids.append(t)
        seg.advance(len(b.token_ids))
        assert seg.text() == continuation_text(decode, b.prefix, b.token_ids, special)
    assert "é" not in seg.text() and seg.version > 0


def test_stream_waits_through_an_incomplete_byte_run_instead_of_stopping(byte_fallback):
    """Two CJK characters as six byte tokens: after the first character's three bytes the text
    shows it, and the next character's first byte turns the whole run into U+FFFD until that
    character completes. The stream waits there (it used to stop streaming until `finish`)
    and goes on once the run is valid again, ending equal to the final text."""
    decode, ctrl, eos, special, split, ordinary = byte_fallback
    req = Request("r", "", [split[0]], SamplingParams())
    req.budget = None                          # no max_tokens cut
    text = TreeText(decode, special)
    streamer = ReadingOrderStreamer(req, text, ctrl, special)
    root = req.branches[0]
    sent_after = []
    for tok in [ordinary[-1]] + [5 + x for x in "你好".encode()] + [ordinary[-2], eos]:
        root.token_ids.append(tok)
        if tok == eos:
            root.finish_reason = FinishReason.STOP
            req.num_live = 0
        streamer.step([BranchDelta(0, None, None, [tok], tok == eos)])
        sent_after.append(streamer.sent)
        assert not streamer.diverged
    final = recover_text(decode, req.branches, ctrl, special)
    assert "你好" in final and "你" in sent_after[4] and "你好" in sent_after[7]
    streamer.finish(final)
    assert streamer.sent == final


# ---- random trees through the streamer ------------------------------------------------------

def grow_tree(rng, req, ctrl, eos, split, ordinary, max_depth=2, wild_stops=True):
    """Grow a random APAR tree one step at a time; yields each step's deltas. Branches take 1-3
    tokens a step (Medusa-like), fork, end on EOS, and sometimes end on a stop-string cut placed
    at random in their own text."""
    branches = req.branches
    while True:
        live = [b for b in branches if not b.finished]
        if not live:
            return
        deltas = []
        for b in live:
            if rng.random() < 0.25:
                continue
            d = BranchDelta(b.id, b.parent, b.fork_index, [], False)
            deltas.append(d)
            for _ in range(int(rng.integers(1, 4))):
                r = rng.random()
                last = b.token_ids[-1] if b.token_ids else None
                fork_p = 0.3 if b.parent is None and not b.children else 0.1
                if r < fork_p and b.depth < max_depth and last not in (ctrl.fork, ctrl.child):
                    tok = ctrl.fork
                elif r < fork_p + 0.03 and len(b.token_ids) > (20 if b.parent is None else 3):
                    tok = eos
                else:
                    tok = draw(rng, split, ordinary, 1)[0]
                b.token_ids.append(tok)
                d.new_token_ids.append(tok)
                if tok == ctrl.fork:
                    c = Branch(len(branches), b.id, len(b.token_ids) - 1, b.depth + 1, b.child_prefix(len(b.token_ids)),
                               [ctrl.child])
                    branches.append(c)
                    b.children.append(c.id)
                    req.forks += 1            # the request's counters, as the scheduler keeps them
                    req.num_live += 1
                    deltas.append(BranchDelta(c.id, b.id, c.fork_index, [ctrl.child], False))
                    break
                if tok == eos or len(b.token_ids) > 60:
                    b.finish_reason = FinishReason.STOP
                    req.num_live -= 1
                    d.finished = True
                    break
            if not b.finished and len(b.token_ids) > 8 and (b.parent is not None or b.children) \
                    and rng.random() < 0.03:   # a stop string matched
                own = "".join(segment_text(req_decode[0], req_special[0])(b, s, e)
                              for s, e in own_segments(b, branches))
                # where the scheduler puts the cut: before the stop string that the newest token
                # completed, near the end; sometimes anywhere (a stop string across a fork)
                back = int(rng.integers(0, 6)) if not wild_stops or rng.random() < 0.7 else len(own)
                b.stop_text_len = max(0, len(own) - int(rng.integers(0, back + 1)))
                b.finish_reason = FinishReason.STOP
                req.num_live -= 1
                d.finished = True
        yield deltas


req_decode, req_special = [None], [None]   # the decode grow_tree uses for its stop cuts
# the random trees' stop strings, which the streams hold back (grow_tree does not act on them):
# none, and some that begin with common characters of the random text (MULTIBYTE), so that the
# text often ends in a partial match
STOPS = [(), ("lo!", "o!!", "d?!", " wz", "é\n", "the ")]


def partial_match(stops, text: str) -> int:
    """The oracle of `StopPrefixes.held`, by its definition: the longest end of `text` that is a
    proper prefix of one of `stops`."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def own_segments(b, branches):
    starts = [0] + [branches[c].fork_index + 1 for c in b.children]
    return list(zip(starts, starts[1:] + [len(b.token_ids)]))


def own_oracle(decode, special, b, branches, stops):
    """A branch's own text as the per-branch events promise it, from a plain decode per segment."""
    own = "".join(segment_text(decode, special)(b, s, e) for s, e in own_segments(b, branches))
    if b.finished:
        return own if b.stop_text_len is None else own[:b.stop_text_len]
    own = own.rstrip("\ufffd")
    return own[:len(own) - partial_match(stops, own)]


class ContractStream:
    """The stream the contract promises: the growth of settled_text. A shorter settled text (an
    incomplete byte run, say) waits; one that contradicts what was sent ends it (diverged)."""

    def __init__(self) -> None:
        self.sent, self.diverged = "", False

    def update(self, now: str) -> None:
        if not self.diverged:
            if now.startswith(self.sent):
                self.sent = now
            elif not self.sent.startswith(now):
                self.diverged = True


@pytest.mark.parametrize("which", ["demo", "demo_bytes", "byte_fallback"])
@pytest.mark.parametrize("join", ["inplace", "reference"])
@pytest.mark.parametrize("seed", range(6))
def test_streamed_text_equals_a_full_rerender_at_every_step(which, join, seed, request):
    decode, ctrl, eos, special, split, ordinary = request.getfixturevalue(which)
    req_decode[0], req_special[0] = decode, special
    rng = np.random.default_rng(seed)
    budget = [None, 25, 70, 160][seed % 4]
    stops = STOPS[seed % 2]
    prompt = draw(rng, split, ordinary, 10)
    req = Request("r", "", prompt, SamplingParams())
    req.budget = budget
    text = TreeText(Counting(decode), special, byte_table=byte_table_of(which))
    streamer = ReadingOrderStreamer(req, text, ctrl, special, stops, join=join)
    ref = ContractStream()
    own_sent: dict[int, str] = {}
    own_ref: dict[int, str] = {}
    steps = held = 0
    for deltas in grow_tree(rng, req, ctrl, eos, split, ordinary):
        steps += 1
        streamer.step(deltas)
        now = settled_text(decode, req.branches, ctrl, special, stops, join=join, budget=budget)
        ref.update(now)
        assert streamer.diverged == ref.diverged
        assert streamer.sent == ref.sent
        if stops:   # steps at which a partial match was held back
            held += now != settled_text(decode, req.branches, ctrl, special, join=join, budget=budget)
        for ev in streamer.branch_events(deltas):
            # each branch's own text, sent as it grows (as the contract's stream: only while it extends)
            want = own_oracle(decode, special, req.branches[ev.id], req.branches, stops)
            prev = own_ref.get(ev.id, "")
            own_ref[ev.id] = want if want.startswith(prev) else prev
            own_sent[ev.id] = own_sent.get(ev.id, "") + ev.text
            assert own_sent[ev.id] == own_ref[ev.id]
    final = recover_text(decode, req.branches, ctrl, special, join=join, budget=budget)
    # the engine's finalize path: the same walk over the incremental segments
    assert recover_text(decode, req.branches, ctrl, special, join=join, budget=budget,
                        segment=text.segment_renderer(req.branches)) == final
    streamer.finish(final)
    if not ref.diverged:
        assert streamer.sent == final
    assert steps > 5 and len(req.branches) > 1
    assert held or not stops or budget == 25   # (25 tokens may all be read before a partial match)


@pytest.mark.parametrize("which", ["demo_bytes", "demo"])
@pytest.mark.parametrize("seed", range(4))
def test_stream_called_every_few_steps_beside_a_reader_equals_the_settled_text(which, seed, request):
    """A server with --stream-interval runs the streamer after some steps only (with the last
    step's deltas), and a reader (per-branch events, finalize) may bring the request's text
    ahead of what the stream took. The deltas, joined without ever asking the streamer for its
    text in between, still follow the contract's stream after each call (the growth of
    settled_text), and end equal to the final text."""
    decode, ctrl, eos, special, split, ordinary = request.getfixturevalue(which)
    req_decode[0], req_special[0] = decode, special
    rng = np.random.default_rng(100 + seed)
    stops = STOPS[seed % 2]
    req = Request("r", "", draw(rng, split, ordinary, 10), SamplingParams())
    req.budget = None
    text = TreeText(decode, special, byte_table=byte_table_of(which))
    streamer = ReadingOrderStreamer(req, text, ctrl, special, stops)
    joined = ""
    ref = ContractStream()
    calls = 0
    for deltas in grow_tree(rng, req, ctrl, eos, split, ordinary, wild_stops=False):
        r = rng.random()
        if r < 0.3:
            continue                 # a held step: the stream skips it
        if r < 0.5:
            text.sync(req.branches)  # a reader takes every branch's text first
        joined += streamer.step(deltas)
        calls += 1
        ref.update(settled_text(decode, req.branches, ctrl, special, stops))
        assert streamer.diverged == ref.diverged
        assert joined == ref.sent
    final = recover_text(decode, req.branches, ctrl, special)
    joined += streamer.finish(final)
    assert calls > 5 and (ref.diverged or joined == final)


def test_many_random_trees_take_the_incremental_path(demo):
    """Most steps are served by the streamer's own walk, not by the full re-render it falls back to."""
    decode, ctrl, eos, special, split, ordinary = demo
    req_decode[0], req_special[0] = decode, special
    fallbacks = 0
    for seed in range(20):
        rng = np.random.default_rng(100 + seed)
        req = Request("r", "", draw(rng, split, ordinary, 10), SamplingParams())
        req.budget = None
        streamer = ReadingOrderStreamer(req, TreeText(decode, special), ctrl, special, STOPS[1])
        for deltas in grow_tree(rng, req, ctrl, eos, split, ordinary, wild_stops=False):
            streamer.step(deltas)
        fallbacks += streamer._fallback
    assert fallbacks <= 4


# ---- decode work per step -------------------------------------------------------------------

def test_stream_decode_work_per_step_does_not_grow_with_the_text(demo):
    """One long branch streamed token by token: the tokens decoded per step stay bounded (the old
    streamer decoded the whole growing segment every step)."""
    decode, ctrl, eos, special, split, ordinary = demo
    rng = np.random.default_rng(7)
    req = Request("r", "", draw(rng, split, ordinary, 10), SamplingParams(stop=("xyz",)))
    req.budget = 10_000
    count = Counting(decode)
    streamer = ReadingOrderStreamer(req, TreeText(count, special), ctrl, special, ("xyz",))
    b = req.branches[0]
    per_step = []
    for tok in draw(rng, split, ordinary, 1500):
        b.token_ids.append(tok)
        before = count.tokens
        streamer.step([BranchDelta(0, None, None, [tok], False)])
        streamer.branch_events([BranchDelta(0, None, None, [tok], False)])
        per_step.append(count.tokens - before)
    early, late = per_step[50:300], per_step[-250:]
    assert max(late) <= 3 * REBASE + 4
    assert sum(late) <= 1.5 * sum(early) + 50
    assert streamer.sent == settled_text(decode, req.branches, ctrl, special, ("xyz",))


# ---- the engine: streaming, finalize, stop strings, max_tokens -------------------------------

def test_engine_stream_and_final_text_equal_the_full_render(demo):
    """Real scheduler trees (random logits, forks favoured, seeded sampling): what the streamer
    sends each step equals the re-rendered settled text, the engine's final text equals
    recover_text over a plain decode, with stop strings and max_tokens cutting trees."""
    from apar_rt.bench.overhead import RandomLogitsBackend
    from apar_rt.config import EngineConfig, ModelConfig
    from apar_rt.engine import Engine
    from apar_rt.model.tokenizer import load_tokenizer

    decode, ctrl, eos, special, split, ordinary = demo
    tok = load_tokenizer(DEMO)
    mc = ModelConfig.from_dir(DEMO)
    eng = Engine(RandomLogitsBackend(mc.vocab_size, seed=3), tok, mc,
                 EngineConfig(num_blocks=512, block_size=16, max_num_seqs=32, mode="apar"))
    streams = {}
    rng = np.random.default_rng(5)
    for i in range(12):
        params = SamplingParams(max_tokens=[20, 60, 150][i % 3], temperature=1.0, seed=i, ignore_eos=i % 2 == 0,
                                stop=[(), ("e",), ("th", "an")][i % 3], logit_bias={ctrl.fork: 4.0, eos: 1.5})
        rid = eng.add_request(None, params, prompt_token_ids=draw(rng, split, ordinary, 8))
        req = eng._requests[rid]
        streams[rid] = (req, ReadingOrderStreamer.for_engine(eng, req), [""])
    done = {}
    while eng.has_unfinished():
        for o in eng.step():
            req, s, ref = streams[o.request_id]
            if o.finished:
                s.finish(o.text)
                done[o.request_id] = (req, o, s)
                continue
            s.step(o.deltas)
            now = settled_text(decode, req.branches, ctrl, special, s.stops, budget=req.budget)
            assert now.startswith(ref[0]) and s.sent == now
            ref[0] = now
    forks = cut = 0
    for req, o, s in done.values():
        final = recover_text(decode, req.branches, ctrl, special, budget=req.budget)
        assert o.text == final and s.sent == final
        forks += len(req.branches) - 1
        cut += o.finish_reason == FinishReason.LENGTH
    assert forks >= 10 and cut >= 3


def test_finalize_of_an_unstreamed_request_decodes_each_segment_once(demo):
    """Without a streamer, finalize decodes every segment once (as the full render does)."""
    decode, ctrl, eos, special, split, ordinary = demo
    req_decode[0], req_special[0] = decode, special
    rng = np.random.default_rng(11)
    req = Request("r", "", draw(rng, split, ordinary, 10), SamplingParams())
    req.budget = None
    for _ in grow_tree(rng, req, ctrl, eos, split, ordinary):
        pass
    count = Counting(decode)
    text = TreeText(count, special)
    assert recover_text(decode, req.branches, ctrl, special, segment=text.segment_renderer(req.branches)) == \
        recover_text(decode, req.branches, ctrl, special)
    total = sum(len(b.token_ids) for b in req.branches)
    assert count.tokens <= total + 8 * 2 * sum(1 + len(b.children) for b in req.branches)


def test_tree_text_decodes_in_full_when_not_incremental(demo):
    """TreeText(incremental=False), for tokenizers whose clean-up rules reach across tokens: still the contract."""
    decode, ctrl, eos, special, split, ordinary = demo
    req_decode[0], req_special[0] = decode, special
    rng = np.random.default_rng(3)
    req = Request("r", "", draw(rng, split, ordinary, 10), SamplingParams())
    req.budget = 50
    text = TreeText(decode, special, incremental=False)
    streamer = ReadingOrderStreamer(req, text, ctrl, special, STOPS[1])
    for deltas in grow_tree(rng, req, ctrl, eos, split, ordinary):
        streamer.step(deltas)
        assert streamer.diverged or streamer.sent == settled_text(decode, req.branches, ctrl, special, STOPS[1],
                                                                  budget=50)
    assert recover_text(decode, req.branches, ctrl, special, budget=50, segment=text.segment_renderer(req.branches)) \
        == recover_text(decode, req.branches, ctrl, special, budget=50)


# ---- stop strings ---------------------------------------------------------------------------

@pytest.mark.parametrize("filtered", [False, True], ids=["every-token", "stop-filter"])
@pytest.mark.parametrize("which", ["demo", "demo_bytes", "byte_fallback", "metaspace", "wordpiece", "bpe_suffix"])
def test_stop_strings_are_found_where_the_whole_branch_text_first_holds_one(which, filtered, request):
    """The scheduler's incremental stop check against apar.branch_text decoded in full after
    every token: the same first token that completes a stop string, the same cut. With the stop
    filter (checks only after tokens that could complete one), the same, with fewer checks.
    The stop strings are pieces of the text, so they end in spaces, multi-byte characters and
    characters split over byte tokens. The five tokenizers cover the decoder steps the filter
    accepts (ByteLevel, ByteFallback, Replace, Fuse, Strip, Metaspace, WordPiece, BPEDecoder)."""
    from apar_rt.apar import branch_text
    from apar_rt.config import EngineConfig
    from apar_rt.scheduler import Scheduler
    from apar_rt.stop_filter import StopFilter

    decode, ctrl, eos, special, split, ordinary = request.getfixturevalue(which)
    found = checks = appended = 0
    for seed in range(30):
        rng = np.random.default_rng(seed)
        tokens = draw(rng, split, ordinary, 80)
        text = decode(tokens)
        stops = tuple({text[i:i + int(rng.integers(1, 4))] for i in rng.integers(20, max(21, len(text) - 3), 2)})
        wide = [j for j in range(20, len(text)) if ord(text[j]) > 127 and text[j] != "\ufffd"]
        if wide:   # one that ends in a multi-byte character (its last byte may be a token of its own)
            j = wide[int(rng.integers(0, len(wide)))]
            stops += (text[j - 1:j + 1],)
        stops = tuple(s for s in stops if s) or ("zz",)
        sched = Scheduler(EngineConfig(num_blocks=8, block_size=4), ctrl, max_model_len=1000, decode=decode,
                          special_ids=special, stop_filter=StopFilter(decode) if filtered else None,
                          byte_table=byte_table_of(which))
        b = Branch(0, None, None, 0, draw(rng, split, ordinary, 6), [])
        want_at, want_cut = None, None
        for i, t in enumerate(tokens):
            b.token_ids.append(t)
            appended += 1
            full = branch_text(decode, b, special)
            if want_at is None and any(s in full for s in stops):
                want_at, want_cut = i, min(full.find(s) for s in stops if s in full)
            if sched._hit_stop_string(b, stops):
                assert (i, b.stop_text_len) == (want_at, want_cut)
                found += 1
                break
        else:
            assert want_at is None
        checks += sched.num_stop_checks
    assert found >= 15
    assert checks <= appended if filtered else checks == appended   # demo: 527 of 698 with the filter


def test_decoder_pipelines_the_stop_filter_accepts():
    """Pipelines whose steps keep each token's characters in any context (up to whitespace and
    split UTF-8) get a filter; a step that rewrites across tokens or strips other characters, or
    an unknown one, gets none (every token is checked)."""
    from apar_rt.model.tokenizer import load_tokenizer
    from apar_rt.stop_filter import StopFilter, decoder_is_local, for_tokenizer

    llama = {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                                              {"type": "ByteFallback"}, {"type": "Fuse"},
                                              {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    assert decoder_is_local(llama) and decoder_is_local(None)
    assert decoder_is_local({"type": "ByteLevel"}) and decoder_is_local({"type": "WordPiece", "cleanup": True})
    after_fuse = {"type": "Sequence", "decoders": [{"type": "Fuse"},
                                                   {"type": "Replace", "pattern": {"Regex": "a+b"}, "content": "c"}]}
    assert not decoder_is_local(after_fuse)
    assert not decoder_is_local({"type": "Strip", "content": "x", "start": 1, "stop": 0})
    assert not decoder_is_local({"type": "CTC"})
    tok = load_tokenizer(DEMO)
    assert isinstance(for_tokenizer(tok, lambda ids: tok.decode(ids, skip_special_tokens=True)), StopFilter)
    assert for_tokenizer(object(), str) is None


def test_the_stop_filter_checks_every_token_for_stops_ending_in_whitespace_or_a_partial_character(demo):
    """Whitespace and U+FFFD at the end of a stop string: every token. A token that holds part of a
    character: checked when a stop string ends in a non-ASCII character (it may complete one),
    else only for its own ASCII characters."""
    decode = demo[0]
    from apar_rt.stop_filter import StopFilter

    f = StopFilter(decode)
    colon = [t for t in demo[5] if decode([t]) == ":"][0]
    plain = [t for t in demo[5] if decode([t]).isalpha()][0]
    partial = [t for t in demo[4] if decode([t]) == "\ufffd"][0]
    assert f.may_complete(colon, ("User:",)) and not f.may_complete(plain, ("User:",))
    assert f.may_complete(partial, ("café",)) and f.may_complete(partial, ("User:", "naïve ç"))
    assert not f.may_complete(partial, ("User:",))        # cannot write a ':' in any context
    assert f.may_complete(plain, ("User: ",)) and f.may_complete(plain, ("\n",))
    assert f.may_complete(plain, ("x\ufffd",))


def test_the_stop_filters_remembered_verdicts_are_the_ones_it_works_out(demo):
    """`may_complete` reads a verdict back once it has worked it out: across many stop sets (more
    than it keeps verdicts for, so they are forgotten and worked out again) and tokens asked in
    any order, every answer equals a fresh filter's first answer."""
    decode = demo[0]
    from apar_rt.stop_filter import StopFilter

    f = StopFilter(decode)
    tokens = list(range(60))
    rng = np.random.default_rng(0)
    stop_sets = [("User:",), ("café",), ("</s>", "\nUser:"), ("x\ufffd",), ("a", "b")]
    stop_sets += [(f"s{i}",) for i in range(StopFilter.MAX_VERDICT_SETS + 5)]
    fresh: dict[tuple, bool] = {}
    for _ in range(2):
        for stops in stop_sets:
            for t in rng.choice(tokens, 120).tolist():   # each token asked about twice, on average
                if (t, stops) not in fresh:
                    fresh[t, stops] = StopFilter(decode).may_complete(t, stops)
                assert f.may_complete(t, stops) == fresh[t, stops], (t, stops)
    assert len(f._verdicts) <= StopFilter.MAX_VERDICT_SETS


def test_stop_checks_decode_work_follows_the_new_tokens(demo):
    """With the stop filter, checks fall on tokens that hold part of a character, after which the
    text often ends incomplete: such a segment still commits up to its last whole character, so
    a long branch is not decoded in full at each check. Uniformly random tokens of the demo's
    byte-level BPE (an eighth are lone bytes). (Sentencepiece byte fallback renders a whole run of
    byte tokens as one unit, so a long invalid run is decoded again per check: not tested here.)"""
    from apar_rt.config import EngineConfig
    from apar_rt.scheduler import Scheduler
    from apar_rt.stop_filter import StopFilter

    decode, ctrl, eos, special, split, ordinary = demo
    count = Counting(decode)
    sched = Scheduler(EngineConfig(num_blocks=8, block_size=4), ctrl, max_model_len=5000, decode=count,
                      special_ids=special, stop_filter=StopFilter(decode))
    rng = np.random.default_rng(5)
    b = Branch(0, None, None, 0, [int(t) for t in rng.choice(ordinary, 6)], [])
    tokens = [int(t) for t in rng.choice(ordinary, 3000)]
    for t in tokens:
        b.token_ids.append(t)
        assert not sched._hit_stop_string(b, ("\x01never\x02é",))   # non-ASCII end: partial tokens checked
    assert sched.num_stop_checks > 100
    assert count.tokens <= 40 * len(tokens), (count.tokens, sched.num_stop_checks)


# ---- the byte table ------------------------------------------------------------------------

def _byte_level_folder(tmp_path, clean_up: bool = False) -> Path:
    """A trained byte-level BPE (GPT-2 style) with special tokens and plain-text added tokens, saved
    as a folder."""
    import json

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<s>", "</s>", "[SplitMask]", "[SplitSop]"])
    tok.train_from_iterator([MULTIBYTE * 4, "the cat sat on the mat. 1. 2. a list of things"] * 20, trainer)
    tok.add_tokens([AddedToken("日本 語", special=False), AddedToken("<note>", special=False)])
    tmp_path.mkdir(parents=True, exist_ok=True)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<s>",
                                                                "clean_up_tokenization_spaces": clean_up}))
    return tmp_path


def test_byte_table_decodes_as_the_tokenizer(tmp_path):
    """The byte table against the tokenizer's own decode (skip_special_tokens=True) on random ids
    rich in pieces of characters, special and plain-text added tokens, and ids past the vocabulary;
    for the demo tokenizer and a trained byte-level BPE."""
    from apar_rt.model.byte_table import byte_table
    from apar_rt.model.tokenizer import load_tokenizer

    for folder in (DEMO, _byte_level_folder(tmp_path / "bl")):
        tok = load_tokenizer(folder)
        n = len(tok)
        table = byte_table(tok, vocab_size=n + 3)   # a padded embedding: ids past the vocabulary
        assert table is not None
        split = tok.encode(MULTIBYTE, add_special_tokens=False)
        rng = np.random.default_rng(0)
        for _ in range(3000):
            k = int(rng.integers(1, 16))
            ids = [int(x) for x in np.where(rng.random(k) < 0.5, rng.choice(split, k), rng.integers(0, n + 3, k))]
            assert table.decode(ids) == tok.decode(ids, skip_special_tokens=True), ids


def test_whole_text_is_what_a_token_adds_after_whole_text(tmp_path):
    """`ByteTable.whole_text` against the tokenizer's decode: a token with a whole text adds
    exactly it after any text that ends whole, and after any other token; a token without one is
    a piece of a character (its text depends on what follows). Both tokenizers have whole texts
    beyond ASCII (whole characters, lone bytes that start no character)."""
    from apar_rt.model.byte_table import byte_table
    from apar_rt.model.tokenizer import load_tokenizer

    for folder in (DEMO, _byte_level_folder(tmp_path / "bl")):
        tok = load_tokenizer(folder)
        table = byte_table(tok)
        n = len(tok)
        decode = partial(tok.decode, skip_special_tokens=True)
        whole = [t for t in range(n) if table.whole_text[t] is not None]
        pieces = [t for t in range(n) if table.whole_text[t] is None]
        assert pieces and any(table.whole_text[t] and not table.whole_text[t].isascii() for t in whole)
        rng = np.random.default_rng(1)
        for _ in range(3000):
            before = [int(x) for x in rng.choice(whole, int(rng.integers(0, 6)))]   # ends whole
            t = int(rng.choice(whole))
            assert decode(before + [t]) == decode(before) + table.whole_text[t], (before, t)
            after = int(rng.integers(0, n))   # the text after it does not change what it added
            assert decode(before + [t, after]).startswith(decode(before) + table.whole_text[t])
        for t in pieces:   # its bytes are an incomplete character: another byte may complete it
            assert table.token_bytes[t] and decode([t]).endswith(REPLACEMENT), t


def test_byte_table_only_where_it_is_exact(tmp_path):
    """No table for a decoder that is not byte-level alone, for clean-up of spaces, and for a
    tokenizer whose decode disagrees with its bytes (the check at load)."""
    from tokenizers import Tokenizer, decoders, models

    from apar_rt.model.byte_table import byte_table
    from apar_rt.model.tokenizer import FastTokenizer, load_tokenizer

    assert byte_table(load_tokenizer(_byte_level_folder(tmp_path / "clean", clean_up=True))) is None
    meta = tmp_path / "meta"
    meta.mkdir()
    tok = Tokenizer(models.BPE(vocab={"<unk>": 0, "▁a": 1, "b": 2}, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Metaspace()
    tok.save(str(meta / "tokenizer.json"))
    assert byte_table(load_tokenizer(meta)) is None

    class Shouting(FastTokenizer):
        def decode(self, token_ids, skip_special_tokens=False):
            return super().decode(token_ids, skip_special_tokens).upper()

    assert byte_table(Shouting(_byte_level_folder(tmp_path / "shout"))) is None
