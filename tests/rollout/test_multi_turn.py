"""Multi-turn rollouts (grpokit.rollout.multi_turn, grpokit.rollout.tools): parsers, schemas, calling tools,
the transcript a scripted engine produces (tokens, masks, budgets, environments), token-in/token-out against
the training forward, and the single-turn rollout recovered exactly when no tool is called."""

import asyncio
import time

import pytest
import torch

from grpokit import GRPOConfig
from grpokit.config import TOOL_CALL_PARSERS
from grpokit.models.forward import completion_logps
from grpokit.rollout import HFEngine, LeanEngine, Rollout, SamplingParams, left_pad, select_rows
from grpokit.rollout.multi_turn import (
    MultiTurnSampler,
    episode_metrics,
    episodes_from_rollout_func,
    tool_suffix_ids,
)
from grpokit.rollout.tools import (
    PARSERS,
    CompactParser,
    call_tool,
    make_parser,
    make_tool,
    make_tools,
    parse_hermes,
)
from grpokit.tasks.demo import char_tokenizer, tiny_model
from grpokit.training.dynamic_sampling import cat_rollouts


def peek() -> str:
    """Return the hidden letter."""
    return "c"


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first.
        b: the second.
    """
    return a + b


def pause(seconds: float) -> str:
    """Sleep.

    Args:
        seconds: how long.
    """
    time.sleep(seconds)
    return "awake"


def broken() -> str:
    """Always fails."""
    raise RuntimeError("out of order")


# ----------------------------------------------------------------------------------------------------------
# parsers, schemas, calls


def test_builtin_parser_names_match_the_config():
    assert PARSERS == TOOL_CALL_PARSERS


def test_hermes_finds_every_call_and_reads_string_arguments():
    text = ('let me add <tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call> and '
            '<tool_call>{"name": "peek", "arguments": "{}"}</tool_call>')
    assert parse_hermes(text) == [{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "peek", "arguments": {}}]
    assert parse_hermes("no call here") == []
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_hermes("<tool_call>{name: add}</tool_call>")
    with pytest.raises(ValueError, match="string 'name'"):
        parse_hermes('<tool_call>{"arguments": {}}</tool_call>')


def test_compact_calls_by_prefix_with_positional_and_keyword_arguments():
    parser = CompactParser(make_tools([peek, add, pause]))
    assert parser("!peek") == [{"name": "peek", "arguments": {}}]
    assert parser("thinking\n  !a 2 b=3\n!pa 0.5") == [{"name": "add", "arguments": {"a": 2, "b": 3}},
                                                    {"name": "pause", "arguments": {"seconds": 0.5}}]
    assert parser("!nope x") == [{"name": "nope", "arguments": {}}]  # unknown: the call reports it
    assert parser('!add "two words" 1') == [{"name": "add", "arguments": {"a": "two words", "b": 1}}]
    assert parser("no ! at the start") == []
    for text in ("!p", "!"):  # peek or pause; any of the three
        with pytest.raises(ValueError, match="ambiguous"):
            parser(text)
    with pytest.raises(ValueError, match="takes 2 argument"):
        parser("!add 1 2 3")
    assert CompactParser(make_tools([peek]))("!") == [{"name": "peek", "arguments": {}}]  # the only tool


def test_make_parser_by_name_callable_or_module_path():
    tools = make_tools([peek])
    assert make_parser("auto", tools, chat=True) is parse_hermes
    assert isinstance(make_parser("auto", tools, chat=False), CompactParser)
    assert make_parser("hermes", tools, chat=False) is parse_hermes
    assert make_parser(len, tools, chat=True) is len
    assert make_parser("grpokit.rollout.tools:parse_hermes", tools, chat=True) is parse_hermes
    with pytest.raises(ValueError, match="tool_call_parser must be one of"):
        make_parser("json", tools, chat=True)
    with pytest.raises(ValueError, match="no function 'nope'"):
        make_parser("grpokit.rollout.tools:nope", tools, chat=True)
    with pytest.raises(ValueError, match="tool_call_parser must be one of"):
        GRPOConfig(tool_call_parser="json")


def test_schemas_come_from_get_json_schema_and_a_bad_tool_is_named():
    tool = make_tool(add)
    assert tool.schema["function"]["name"] == "add" and tool.parameters == ("a", "b")
    assert tool.schema["function"]["parameters"]["properties"]["a"] == {"type": "integer", "description": "the first."}

    def undocumented(x):
        return x

    with pytest.raises(ValueError, match="tool 'undocumented'.*JSON schema.*docstring"):
        make_tool(undocumented)
    with pytest.raises(ValueError, match="named 'peek'"):
        make_tools([peek, peek])


def test_failures_become_tool_messages():
    tools = {"broken": broken, "add": add, "pause": pause}
    ok = call_tool({"name": "add", "arguments": {"a": 2, "b": 3}}, tools)
    assert (ok.content, ok.failed) == ("5", False)
    assert call_tool({"name": "broken", "arguments": {}}, tools).content == "{'error': 'out of order'}"
    assert call_tool({"name": "gone", "arguments": {}}, tools).content == "{'error': 'Tool gone not found.'}"
    bad = call_tool({"name": "add", "arguments": {"c": 1}}, tools)
    assert bad.failed and "unexpected keyword argument 'c'" in bad.content
    start = time.perf_counter()
    slow = call_tool({"name": "pause", "arguments": {"seconds": 5}}, tools, timeout=0.1)
    assert slow.failed and "timed out after 0.1 s" in slow.content and time.perf_counter() - start < 2
    assert call_tool({"name": "pause", "arguments": {"seconds": 0}}, tools, timeout=1).content == "awake"

    async def later(x: int) -> int:
        """Async double.

        Args:
            x: a number.
        """
        await asyncio.sleep(0)
        return 2 * x

    assert call_tool({"name": "later", "arguments": {"x": 4}}, {"later": later}).content == "8"


# ----------------------------------------------------------------------------------------------------------
# the loop, through a scripted engine


class ScriptedEngine:
    """Continues each prompt with ``script(text so far)`` (a string; ``<|end|>`` is EOS), cut at
    ``max_new_tokens``; each token gets log-prob -0.5 - 0.01 * position and entropy 1."""

    name = "scripted"

    def __init__(self, tokenizer, script):
        self.tokenizer, self.script, self.calls = tokenizer, script, []

    def generate(self, prompts, params):
        tok = self.tokenizer
        outs = [tok(self.script(tok.decode(p)), add_special_tokens=False)["input_ids"][:params.max_new_tokens]
                for p in prompts]
        self.calls.append([len(p) for p in prompts])
        outs = [o[:o.index(0) + 1] if 0 in o else o for o in outs]
        B, C = len(outs), max(len(o) for o in outs)
        ids = torch.full((B, C), params.pad_token_id)
        mask = torch.zeros(B, C, dtype=torch.long)
        for i, o in enumerate(outs):
            ids[i, :len(o)], mask[i, :len(o)] = torch.tensor(o), 1
        logps = (-0.5 - 0.01 * torch.arange(C).float()).expand(B, C) * mask
        prompt_ids, prompt_mask = left_pad(prompts, params.pad_token_id)
        return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=ids, completion_mask=mask,
                       is_truncated=torch.tensor([0 not in o for o in outs]), sampling_logps=logps,
                       texts=tok.batch_decode(outs, skip_special_tokens=True), sampling_entropy=mask.float())

    def sync_weights(self, model):
        return 0.0

    def close(self):
        pass


def letter_agent(text: str) -> str:
    """Peeks first, then answers what the tool said."""
    return text.split("peek: ")[1][0] if "peek: " in text else "!"


def params_of(tokenizer, max_new_tokens=16):
    return SamplingParams(max_new_tokens=max_new_tokens, eos_token_ids=(tokenizer.eos_token_id,),
                          pad_token_id=tokenizer.pad_token_id)


class LetterEnv:
    resets = []

    def reset(self, letter, **row):
        self.letter, self.peeked = letter, False
        LetterEnv.resets.append(row)

    def peek(self) -> str:
        """Return the hidden letter."""
        self.peeked = True
        return self.letter

    def get_reward(self) -> float:
        return float(self.peeked)


def test_a_tool_round_appends_rendered_environment_tokens_after_the_model_tokens():
    tok = char_tokenizer()
    engine = ScriptedEngine(tok, letter_agent)
    sampler = MultiTurnSampler(environment_factory=LetterEnv)
    rows = [{"prompt": "?", "letter": "c"}, {"prompt": "?", "letter": "d"}]
    LetterEnv.resets.clear()
    ep = sampler.sample(engine, tok, ["?", "?"], rows, params_of(tok), group_size=2)
    r = ep.rollout
    assert r.texts == ["!\npeek: cc", "!\npeek: dd"]
    assert ep.completions == ["c", "d"]  # string prompts: the last turn's text
    env = tok("\npeek: c", add_special_tokens=False)["input_ids"]
    bang, c = tok.convert_tokens_to_ids("!"), tok.convert_tokens_to_ids("c")
    assert r.completion_ids[0].tolist() == [bang, *env, c]
    assert r.model_mask[0].tolist() == [1] + [0] * len(env) + [1]
    assert r.completion_mask.tolist() == [[1] * (len(env) + 2)] * 2
    # the sampler's log-probs on model tokens, as each turn recorded them; 0 on environment tokens
    assert r.sampling_logps[0].tolist() == [-0.5] + [0.0] * len(env) + [-0.5]
    assert r.sampling_entropy[0].tolist() == [1.0] + [0.0] * len(env) + [1.0]
    assert not r.is_truncated.any()
    # turn 2's prompt is the prompt plus the transcript so far, one generate call per turn
    assert engine.calls == [[1, 1], [1 + 1 + len(env)] * 2]
    assert ep.columns["messages"][0] == [
        {"role": "user", "content": "?"},
        {"role": "assistant", "content": "!", "tool_calls": [{"type": "function",
                                                               "function": {"name": "peek", "arguments": {}}}]},
        {"role": "tool", "name": "peek", "content": "c"},
        {"role": "assistant", "content": "c"}]
    assert [e.letter for e in ep.columns["environments"]] == ["c", "d"]
    assert LetterEnv.resets == [{"prompt": "?"}, {"prompt": "?"}]  # reset(**row): letter= and the rest
    assert ep.totals == {"episodes": 2.0, "turns": 4.0, "tool_calls": 2.0, "tool_failures": 0.0, "model_tokens": 4.0,
                         "environment_tokens": 2.0 * len(env)}
    assert episode_metrics(ep.totals) == {"tools/turns": 2.0, "tools/call_frequency": 1.0,
                                          "tools/failure_frequency": 0.0, "tools/model_tokens": 2.0,
                                          "tools/environment_tokens": float(len(env))}
    assert ep.last_texts == ["c", "d"] and ep.last_offsets == [len("!\npeek: c")] * 2
    assert ep.transcript_ends([[1], [0, 1]]) == [[len("!\npeek: c") + 1], [len("!\npeek: d"), len("!\npeek: d") + 1]]
    reward = sampler.environment_reward
    assert reward.__name__ == "LetterEnv" and reward([], [], [], environments=ep.columns["environments"]) == [1.0, 1.0]


def test_budgets_end_episodes():
    tok = char_tokenizer()
    env = len(tok("\npeek: c", add_special_tokens=False)["input_ids"])

    def chatty(text):
        return "!ab" if "peek" not in text else "cccc"

    # max_turn_length cuts each turn; the rest of what the engine drew is dropped
    sampler = MultiTurnSampler(tools=[peek], max_turn_length=2)
    ep = sampler.sample(ScriptedEngine(tok, chatty), tok, ["?"], [{}], params_of(tok), group_size=1)
    assert ep.rollout.texts == ["!a"] and ep.rollout.is_truncated.item()  # 'a' not found: the error is too long
    assert ep.totals["tool_failures"] == 1
    sampler = MultiTurnSampler(tools=[peek], max_turn_length=1)
    ep = sampler.sample(ScriptedEngine(tok, chatty), tok, ["?"], [{}], params_of(tok), group_size=1)
    assert ep.rollout.texts == ["!\npeek: cc"] and not ep.rollout.is_truncated.item()
    # max_tool_calling_iterations: the turn after the last round ends the episode, its calls not run
    sampler = MultiTurnSampler(tools=[peek], max_tool_calling_iterations=0)
    ep = sampler.sample(ScriptedEngine(tok, lambda t: "!"), tok, ["?"], [{}], params_of(tok), group_size=1)
    assert ep.rollout.texts == ["!"] and ep.totals["tool_calls"] == 0
    sampler = MultiTurnSampler(tools=[peek], max_tool_calling_iterations=2)
    ep = sampler.sample(ScriptedEngine(tok, lambda t: "!"), tok, ["?"], [{}], params_of(tok, 64), group_size=1)
    assert ep.rollout.texts == ["!\npeek: c!\npeek: c!"] and ep.totals["turns"] == 3
    # max_completion_length: a tool result that leaves no room for a model token is dropped: truncated
    sampler = MultiTurnSampler(tools=[peek])
    ep = sampler.sample(ScriptedEngine(tok, lambda t: "!"), tok, ["?"], [{}], params_of(tok, 1 + env),
                        group_size=1)
    assert ep.rollout.texts == ["!"] and ep.rollout.is_truncated.item()
    assert ep.columns["messages"][0][-1]["role"] == "assistant"
    ep = sampler.sample(ScriptedEngine(tok, lambda t: "!" if "peek" not in t else "abcd"), tok, ["?"], [{}],
                        params_of(tok, 1 + env + 2), group_size=1)
    assert ep.rollout.texts == ["!\npeek: cab"] and ep.rollout.is_truncated.item()  # the budget cut turn 2
    ep = sampler.sample(ScriptedEngine(tok, lambda t: "!" if "peek" not in t else "ab<|end|>"), tok, ["?"], [{}],
                        params_of(tok, 1 + env + 3), group_size=1)
    assert ep.rollout.texts == ["!\npeek: cab"] and not ep.rollout.is_truncated.item()  # EOS fits: not cut
    assert ep.rollout.completion_mask.sum() == 1 + env + 3


def test_tool_failures_are_counted_and_shown_to_the_model():
    tok = char_tokenizer()
    sampler = MultiTurnSampler(tools=[broken, add], max_tool_calling_iterations=1)
    ep = sampler.sample(ScriptedEngine(tok, lambda t: "!b\n!add 1 2\n!add 1 2 3"), tok, ["?"], [{}],
                        params_of(tok, 200), group_size=1)
    # the third call cannot be parsed: the round is one failure saying so
    assert ep.totals["tool_calls"] == 1 and ep.totals["tool_failures"] == 1
    assert "could not parse the tool call" in ep.columns["messages"][0][2]["content"]
    ep = sampler.sample(ScriptedEngine(tok, lambda t: "!b\n!add 1 2"), tok, ["?"], [{}], params_of(tok, 200),
                        group_size=1)
    assert ep.totals["tool_calls"] == 2 and ep.totals["tool_failures"] == 1
    assert [m["content"] for m in ep.columns["messages"][0][2:4]] == ["{'error': 'out of order'}", "3"]
    assert ep.rollout.texts[0].startswith("!b\n!add 1 2\nbroken: <unk>'error': 'out of order'<unk>\nadd: 3!b")
    assert episode_metrics(ep.totals)["tools/failure_frequency"] == 0.5


class Observed:
    def reset(self, prompt, **row):
        self.turns = 0
        return " (hint)"

    def step(self) -> str:
        """Take a step."""
        self.turns += 1
        self.done = self.turns == 2
        return f"t{self.turns}"


def test_environment_observation_and_done():
    tok = char_tokenizer()
    sampler = MultiTurnSampler(environment_factory=Observed)
    assert sampler.environment_reward is None
    ep = sampler.sample(ScriptedEngine(tok, lambda t: "!"), tok, ["go"], [{"prompt": "go"}], params_of(tok, 100),
                        group_size=1)
    assert ep.prompts == ["go (hint)"]
    assert ep.rollout.prompt_ids[0].tolist() == tok("go (hint)")["input_ids"]
    assert ep.rollout.texts == ["!\nstep: t1!\nstep: t2"]  # done after the second round: it ends on the tool
    assert ep.rollout.model_mask[0, -1] == 0 and ep.totals["turns"] == 2

    class NoReset:
        def look(self) -> str:
            """Look."""
            return ""

    with pytest.raises(ValueError, match="must define a callable reset"):
        MultiTurnSampler(environment_factory=NoReset)
    with pytest.raises(ValueError, match="both a standalone tool and a method"):
        MultiTurnSampler(tools=[Observed().step], environment_factory=Observed)
    with pytest.raises(ValueError, match="column 'messages'"):
        sampler.check_columns(["answer", "messages"])


def test_chat_prompts_render_tool_messages_with_the_chat_template():
    tok = char_tokenizer()
    sampler = MultiTurnSampler(tools=[peek], tool_call_parser="compact")
    prompt = [{"role": "user", "content": "?"}]
    ep = sampler.sample(ScriptedEngine(tok, lambda t: "!<|end|>" if "tool" not in t else "c<|end|>"), tok, [prompt],
                        [{}], params_of(tok), group_size=1)
    suffix = tool_suffix_ids(tok, [{"role": "tool", "name": "peek", "content": "c"}])
    assert tok.decode(suffix) == "<unk><unk>tool<unk><unk>c<|end|><|assistant|>"  # <|tool|>c<|end|><|assistant|>
    end = tok.eos_token_id
    assert ep.rollout.completion_ids[0].tolist() == [tok.convert_tokens_to_ids("!"), end, *suffix,
                                                     tok.convert_tokens_to_ids("c"), end]
    assert ep.completions[0][-1] == {"role": "assistant", "content": "c"}  # completion[-1]["content"]: last turn
    assert [m["role"] for m in ep.completions[0]] == ["assistant", "tool", "assistant"]
    assert ep.columns["messages"][0][0] == prompt[0]
    # a turn cut by max_turn_length: the environment's tokens start with the end-of-turn token it lacks
    sampler = MultiTurnSampler(tools=[peek], tool_call_parser="compact", max_turn_length=1)
    ep = sampler.sample(ScriptedEngine(tok, lambda t: "!<|end|>" if "tool" not in t else "c<|end|>"), tok, [prompt],
                        [{}], params_of(tok), group_size=1)
    assert ep.rollout.completion_ids[0].tolist() == [tok.convert_tokens_to_ids("!"), end, *suffix,
                                                     tok.convert_tokens_to_ids("c")]
    assert ep.rollout.model_mask[0].tolist() == [1] + [0] * (1 + len(suffix)) + [1]

    tok.chat_template = "{% for m in messages %}{% if m['role'] != 'tool' %}{{ m['content'] }}<|end|>{% endif %}" \
                        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    with pytest.raises(ValueError, match="does not render tool messages"):
        MultiTurnSampler(tools=[peek], tool_call_parser="compact").sample(
            ScriptedEngine(tok, lambda t: "!<|end|>"), tok, [prompt], [{}], params_of(tok), group_size=1)


def test_rollout_func_output_becomes_episodes():
    tok = char_tokenizer()
    seen = []

    def rollout_func(prompts, trainer):
        seen.append((prompts, trainer))
        return {"prompt_ids": [[5], [5]], "completion_ids": [[6, 7, 0], [6, 8]], "logprobs": [[-1, -2, -3], [-1, None]],
                "env_mask": [[1, 0, 1], [1, 1]], "extra": ["x", "y"]}

    sampler = MultiTurnSampler(rollout_func=rollout_func)
    ep = sampler.sample(None, tok, ["a", "a"], [{}, {}], params_of(tok), group_size=2, owner="me")
    assert seen == [(["a"], "me")]
    r = ep.rollout
    assert r.completion_mask.tolist() == [[1, 1, 1], [1, 1, 0]] and r.model_mask.tolist() == [[1, 0, 1], [1, 1, 0]]
    assert r.is_truncated.tolist() == [False, True] and torch.isnan(r.sampling_logps[1, 1])
    assert ep.columns["extra"] == ["x", "y"] and ep.completions == r.texts
    assert ep.totals["model_tokens"] == 4 and ep.totals["environment_tokens"] == 1
    with pytest.raises(ValueError, match=r"must return keys \['logprobs'\]"):
        episodes_from_rollout_func({"prompt_ids": [], "completion_ids": []}, ["a"], 1, tok, params_of(tok))
    with pytest.raises(ValueError, match="without tools"):
        MultiTurnSampler(rollout_func=rollout_func, tools=[peek])


def test_cat_rollouts_and_select_rows_keep_the_model_mask():
    tok = char_tokenizer()
    single = ScriptedEngine(tok, lambda t: "ab<|end|>").generate([[5]], params_of(tok))
    multi = MultiTurnSampler(tools=[peek]).sample(ScriptedEngine(tok, letter_agent), tok, ["?"], [{}],
                                                  params_of(tok), group_size=1).rollout
    both = cat_rollouts([single, multi], tok.pad_token_id)
    width = multi.completion_ids.size(1)
    assert both.model_mask.tolist() == [[1, 1, 1] + [0] * (width - 3), multi.model_mask[0].tolist()]
    assert cat_rollouts([single, single], tok.pad_token_id).model_mask is None
    assert torch.equal(select_rows(both, [1]).model_mask, multi.model_mask)


# ----------------------------------------------------------------------------------------------------------
# with a real model: token-in / token-out


def lean_setup(seed=0):
    tok = char_tokenizer()
    model = tiny_model(tok, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    params = SamplingParams(max_new_tokens=12, eos_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id,
                            generator=generator)
    return tok, model, LeanEngine(model, tok), params


def test_no_tool_call_is_the_single_turn_rollout_token_for_token():
    tok, model, engine, params = lean_setup()
    prompts = ["ab", "ab", "c", "c"]
    ids = [tok(p)["input_ids"] for p in prompts]
    single = engine.generate(ids, params)
    params.generator.manual_seed(0)
    for sampler in (MultiTurnSampler(tools=[peek], tool_call_parser=lambda text: []),
                    MultiTurnSampler(tools=[peek], max_tool_calling_iterations=0)):
        params.generator.manual_seed(0)
        multi = sampler.sample(engine, tok, prompts, [{}] * 4, params, group_size=2).rollout
        for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "is_truncated",
                     "sampling_logps", "sampling_entropy"):
            assert torch.equal(getattr(single, name), getattr(multi, name)), name
        assert single.texts == multi.texts
        assert torch.equal(multi.model_mask, single.completion_mask)


def test_model_token_logps_of_the_training_forward_equal_the_sampled_ones():
    """Every turn always calls the tool (a parser that always finds a call), so each transcript is three model
    turns and two tool messages: the training forward over the whole transcript gives the log-probs each turn's
    sampler recorded, to float32 rounding."""
    tok, model, engine, params = lean_setup(seed=1)
    sampler = MultiTurnSampler(tools=[peek], tool_call_parser=lambda text: [{"name": "peek", "arguments": {}}],
                               max_tool_calling_iterations=2, max_turn_length=3)
    params = SamplingParams(**{**params.__dict__, "max_new_tokens": 64})
    ep = sampler.sample(engine, tok, ["ab", "ab", "cd", "cd"], [{}] * 4, params, group_size=2)
    r = ep.rollout
    assert ep.totals["tool_calls"] >= 4 and (r.model_mask == 0).logical_and(r.completion_mask == 1).any()
    with torch.no_grad():
        logps = completion_logps(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
        padded = completion_logps(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask,
                                  padding_free=False)
    where = r.model_mask.bool()
    torch.testing.assert_close(logps[where], r.sampling_logps[where], rtol=0, atol=2e-5)
    torch.testing.assert_close(padded[where], r.sampling_logps[where], rtol=0, atol=2e-5)
    assert (r.sampling_logps[~where] == 0).all()


def test_lean_samples_rows_that_all_differ_in_their_own_order():
    """Turn 2's prompts all differ (each row its own transcript), and distinct rows come out of ``torch.unique``
    sorted: the lean decoder must give each row its own prompt's logits (as the Hugging Face loop does)."""
    tok, model, engine, params = lean_setup()
    prompts = [tok(p)["input_ids"] for p in ("dc", "ab", "ca", "ba")]  # not in sorted order
    lean = engine.generate(prompts, params)
    params.generator.manual_seed(0)
    hf = HFEngine(model, tok).generate(prompts, params)
    assert torch.equal(lean.completion_ids, hf.completion_ids)
    torch.testing.assert_close(lean.sampling_logps, hf.sampling_logps, rtol=0, atol=1e-5)


def test_prompts_are_encoded_with_the_tools_and_cut_as_the_config_says():
    tok = char_tokenizer()
    assert MultiTurnSampler(tools=[peek], max_prompt_length=2).encode(tok, "abcd") == tok("cd")["input_ids"]
    with pytest.raises(ValueError, match="more than max_prompt_length=2 .prompt_truncation: error."):
        MultiTurnSampler(tools=[peek], max_prompt_length=2, prompt_truncation="error").encode(tok, "abcd")
    tok.chat_template = ("{% for t in tools %}[{{ t['function']['name'] }}]{% endfor %}"
                         "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    ids = MultiTurnSampler(tools=[peek, add]).encode(tok, [{"role": "user", "content": "?"}])
    assert tok.decode(ids) == "<unk>peek<unk><unk>add<unk>?"  # [peek][add]?: the schemas reach the template
