"""Multi-turn rollouts: the model calls tools or acts in an environment, turn after turn (agentic GRPO).

An episode alternates model turns and environment turns. Each model turn is sampled by the rollout engine,
one ``engine.generate`` call per turn over every episode still running, whose prompt is the prompt plus the
transcript so far. The loop is token-in / token-out: the model's tokens are kept exactly as they were
sampled (never decoded and re-tokenised), with the log-probs the engine recorded, and the environment's
tokens are the tokenisation of the rendered tool message, appended after them:

    prompt | model turn 1 | tool message 1 | model turn 2 | ... | model turn k
             <- transcript = the completion: completion_mask 1 on all of it, model_mask 1 on model turns ->

An episode ends when the model's turn calls no tool (the parser finds none), when it has used
``max_tool_calling_iterations`` rounds of tool calls (its next turn is its last), when the environment says
so (an environment whose ``done`` attribute is true after a round), or when the transcript fills
``max_completion_length``. A model turn stops at EOS or after ``max_turn_length`` tokens. ``is_truncated``
means the budget cut the episode short: a model turn reached ``max_completion_length`` without EOS, or a tool
message did not fit in what was left (it is then dropped, as TRL drops it).

The loss sees model tokens only (``Batch.loss_mask`` = completion mask x ``Rollout.model_mask``); the tool
messages are context, attended to but never scored. An episode whose model calls no tool is a single-turn
rollout, token for token.

Tool messages enter the transcript through the tokenizer's chat template for chat prompts (the template's
rendering of ``{"role": "tool", "name": ..., "content": ...}`` after the assistant turn, as TRL computes it,
after the end-of-turn token when ``max_turn_length`` cut the turn before the model wrote it);
for plain-string prompts, with no roles to render, as ``PLAIN_TOOL_MESSAGE`` (a line ``name: content`` per
call, the model's next turn right after it).

Three sources of episodes, TRL's arguments of ``GRPOTrainer``: ``tools=[fn, ...]``; ``environment_factory``
(a callable, such as a class, making one environment per episode: ``env.reset(**row)`` with the dataset row,
which may return a first observation, a string appended to the prompt's last message; its public methods are
its tools; ``get_reward()``, or ``reward()``, is one more reward function); and ``rollout_func(prompts,
trainer) -> dict`` for full control.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from grpokit.rollout.engine import Rollout, RolloutEngine, SamplingParams, left_pad, token_lists
from grpokit.rollout.tools import (
    REWARD_METHODS,
    Tool,
    call_tool,
    environment_methods,
    failure,
    make_parser,
    make_tools,
)

PLAIN_TOOL_MESSAGE = "\n{name}: {content}"
"""How a tool message reads after a plain-string prompt's model turn: a line per call, ``name: content``; the
model's next turn follows the last result directly (``"!"`` then ``"\\npeek: c"`` then ``"c"``)."""
MESSAGE_COLUMNS = ("messages", "environments")
"""Keywords the reward functions receive beside the dataset columns: the whole conversation, and the
episode's environment (with ``environment_factory``, TRL's)."""
ROLLOUT_FUNC_KEYS = ("prompt_ids", "completion_ids", "logprobs")
"""What a ``rollout_func`` must return (TRL's contract); ``env_mask`` (1 on model tokens) is optional and
every other key reaches the reward functions as a keyword."""
TOTALS = ("episodes", "turns", "tool_calls", "tool_failures", "model_tokens", "environment_tokens")


def is_chat(prompt: Any) -> bool:
    return isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt)


@dataclasses.dataclass(frozen=True)
class Episodes:
    """N finished episodes; a group's G episodes are consecutive rows."""

    rollout: Rollout
    """Their transcripts as the completions, ``model_mask`` set; ``texts`` are the whole transcripts."""
    prompts: list
    """N prompts as the model saw them (an environment's first observation appended)."""
    completions: list
    """What reward functions receive as ``completions`` (TRL's contract): for chat prompts the transcript's
    messages (assistant turns, with their ``tool_calls``, and ``tool`` messages), so ``completion[-1]
    ["content"]`` is the last turn's text; for string prompts the last model turn's text."""
    columns: dict[str, list]
    """Keywords for the reward functions: ``messages`` (prompt and transcript as chat messages; a string prompt
    is a ``user`` message), ``environments`` with ``environment_factory``, a ``rollout_func``'s extra keys."""
    last_texts: list[str]
    """N texts of the last model turn: what process supervision's step ends index."""
    last_offsets: list[int]
    """N character offsets of the last model turn in ``rollout.texts``."""
    totals: dict[str, float]
    """Sums over the N episodes: ``TOTALS`` (``episode_metrics`` makes the logged means)."""

    def transcript_ends(self, char_ends: list[list[int]]) -> list[list[int]]:
        """Step ends in the last turn's text (``last_texts``) -> in the transcript's (``rollout.texts``)."""
        return [[offset + c for c in ends] for ends, offset in zip(char_ends, self.last_offsets)]


def episode_metrics(totals: dict[str, float]) -> dict[str, float]:
    """Per-episode means of a rollout's totals: ``tools/turns`` (model turns), ``tools/call_frequency``
    (calls, TRL's name), ``tools/failure_frequency`` (failed calls / calls, TRL's), ``tools/model_tokens``,
    ``tools/environment_tokens``; turns and calls are not known of a ``rollout_func``'s episodes."""
    totals = add_totals(totals, {})
    episodes = max(totals["episodes"], 1.0)
    metrics = {}
    if totals["turns"]:
        metrics.update({"tools/turns": totals["turns"] / episodes,
                        "tools/call_frequency": totals["tool_calls"] / episodes,
                        "tools/failure_frequency": totals["tool_failures"] / max(totals["tool_calls"], 1.0)})
    metrics.update({"tools/model_tokens": totals["model_tokens"] / episodes,
                    "tools/environment_tokens": totals["environment_tokens"] / episodes})
    return metrics


def add_totals(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: a.get(k, 0.0) + b.get(k, 0.0) for k in TOTALS}


class EnvironmentReward:
    """An environment's ``get_reward()`` (or ``reward()``) as a reward function (TRL: weight 1, named after
    the environment's class): it reads the ``environments`` keyword."""

    def __init__(self, name: str):
        self.__name__ = name

    def __call__(self, prompts, completions, completion_ids, environments, **columns) -> list[float | None]:
        out = []
        for env in environments:
            method = next((getattr(env, m) for m in REWARD_METHODS if callable(getattr(env, m, None))), None)
            out.append(None if method is None else method())
        return out


@dataclasses.dataclass
class _Episode:
    """One episode while it runs."""

    prompt: Any
    prompt_ids: list[int]
    chat: bool
    tools: dict[str, Callable]
    env: Any = None
    ids: list[int] = dataclasses.field(default_factory=list)
    model_mask: list[int] = dataclasses.field(default_factory=list)
    logps: list[float] = dataclasses.field(default_factory=list)
    entropy: list[float] = dataclasses.field(default_factory=list)
    messages: list[dict] = dataclasses.field(default_factory=list)
    last_text: str = ""
    last_start: int = 0
    rounds: int = 0
    turns: int = 0
    calls: int = 0
    failures: int = 0
    truncated: bool = False


class MultiTurnSampler:
    """Samples episodes of a rollout through an engine (see the module docstring).

    Args:
        tools: standalone tool functions, the same for every episode.
        environment_factory: a callable (a class works) returning a fresh environment; one per episode.
        rollout_func: TRL's ``rollout_func(prompts, trainer) -> dict`` (given alone, without tools).
        tool_call_parser: a ``grpokit.rollout.tools`` parser name, ``"module:function"`` or a callable.
        max_tool_calling_iterations: most rounds of tool calls per episode; ``None``: no limit but the budget.
        max_turn_length: most tokens per model turn; ``None``: whatever the transcript has left.
        tool_timeout: seconds a tool call may run; ``None``: no limit.
        max_prompt_length, prompt_truncation: a longer prompt (tools rendered in) keeps its last tokens
            (``left``) or is an error (``error``).
    """

    def __init__(self, *, tools: Sequence[Callable] | None = None, environment_factory: Callable | None = None,
                 rollout_func: Callable | None = None, tool_call_parser: str | Callable = "auto",
                 max_tool_calling_iterations: int | None = None, max_turn_length: int | None = None,
                 tool_timeout: float | None = None, max_prompt_length: int | None = None,
                 prompt_truncation: str = "left"):
        if rollout_func is not None and (tools or environment_factory is not None):
            raise ValueError("rollout_func takes over the whole rollout: give it without tools or environment_factory")
        if rollout_func is not None and not callable(rollout_func):
            raise ValueError(f"rollout_func must be a callable (prompts, trainer) -> dict, got {rollout_func!r}")
        if tools is not None and (callable(tools) or isinstance(tools, str)):
            tools = [tools]
        self.tools = make_tools(list(tools or []))
        self.environment_factory = environment_factory
        self.rollout_func = rollout_func
        self.environment_tools: list[Tool] = []
        self.environment_reward: EnvironmentReward | None = None
        if environment_factory is not None:
            self._probe_environment(environment_factory)
        self.tool_call_parser = tool_call_parser
        self.max_rounds = max_tool_calling_iterations
        self.max_turn_length = max_turn_length
        self.tool_timeout = tool_timeout
        self.max_prompt_length, self.prompt_truncation = max_prompt_length, prompt_truncation
        self.schemas = [t.schema for t in self.tools + self.environment_tools]
        every = self.tools + self.environment_tools
        self.parsers = {chat: make_parser(tool_call_parser, every, chat=chat) for chat in (True, False)}
        self._checked_template = False

    def _probe_environment(self, factory: Callable) -> None:
        """One environment made up front: its tools' schemas (an error now, not mid-run) and its reward."""
        if isinstance(factory, dict):
            raise ValueError("environment_factory as a dict (one environment per value of an 'environment' column) "
                             "is not supported: give one callable")
        if not callable(factory):
            raise ValueError(f"environment_factory must be a callable returning an environment, got {factory!r}")
        env = factory()
        name = type(env).__name__
        if not callable(getattr(env, "reset", None)):
            raise ValueError(f"environment {name} (from environment_factory) must define a callable reset(**row)")
        self.environment_tools = make_tools(environment_methods(env), owner=name)
        clash = {t.name for t in self.tools} & {t.name for t in self.environment_tools}
        if clash:
            raise ValueError(f"tool {sorted(clash)[0]!r} is both a standalone tool and a method of environment {name}")
        if any(callable(getattr(env, m, None)) for m in REWARD_METHODS):
            self.environment_reward = EnvironmentReward(name)

    def with_environment_reward(self, reward_funcs, reward_weights: list[float] | None):
        """The reward functions plus the environment's reward, if it has one, and the weights to match (the
        environment's is 1, as in TRL, unless ``reward_weights`` already has one entry for it)."""
        if self.environment_reward is None:
            return reward_funcs, reward_weights
        funcs = [] if reward_funcs is None else list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) \
            else [reward_funcs]
        if reward_weights is not None and len(reward_weights) == len(funcs):
            reward_weights = [*reward_weights, 1.0]
        return [*funcs, self.environment_reward], reward_weights

    def check_columns(self, columns: Sequence[str]) -> None:
        """The dataset must not have a column named like a keyword the rollout adds (``MESSAGE_COLUMNS``)."""
        for name in MESSAGE_COLUMNS:
            if name in columns:
                raise ValueError(f"the dataset has a column {name!r}, a keyword multi-turn rollouts give the reward "
                                 "functions; rename the column")

    # ------------------------------------------------------------------------------------------------------

    def sample(self, engine: RolloutEngine, tokenizer, prompts: list, rows: list[dict], params: SamplingParams, *,
               group_size: int, owner: Any = None) -> Episodes:
        """Episodes for N prompts (each repeated ``group_size`` times) and their dataset rows; ``params`` as for
        a single-turn rollout (``max_new_tokens`` = ``max_completion_length``, the transcript's budget).
        ``owner``: what a ``rollout_func`` receives as its ``trainer``."""
        if self.rollout_func is not None:
            return episodes_from_rollout_func(self.rollout_func(prompts[::group_size], owner), prompts, group_size,
                                              tokenizer, params)
        episodes = [self._start(tokenizer, prompt, row) for prompt, row in zip(prompts, rows)]
        budget = params.max_new_tokens
        eos = set(params.eos_token_ids)
        active, device, dtype, with_entropy = episodes, None, torch.float32, True
        while active:
            caps = [budget - len(e.ids) for e in active]  # >= 1: an episode with no room has ended
            if self.max_turn_length is not None:
                caps = [min(c, self.max_turn_length) for c in caps]
            out = engine.generate([e.prompt_ids + e.ids for e in active],
                                  dataclasses.replace(params, max_new_tokens=max(caps)))
            device, dtype = out.completion_ids.device, out.sampling_logps.dtype
            with_entropy = with_entropy and out.sampling_entropy is not None
            sampled = token_lists(out.completion_ids, out.completion_mask)
            logps, entropy = out.sampling_logps.tolist(), (out.sampling_entropy.tolist() if with_entropy else None)
            still = []
            for j, (e, cap) in enumerate(zip(active, caps)):
                turn = sampled[j][:cap]  # a row may sample past its own budget: its extra tokens are dropped
                cut = len(turn) < len(sampled[j])
                text = tokenizer.decode(turn, skip_special_tokens=True) if cut else out.texts[j]
                if self._model_turn(e, turn, logps[j], entropy[j] if with_entropy else None, text, eos, budget,
                                    tokenizer):
                    still.append(e)
            active = still
        return self._episodes(episodes, tokenizer, params.pad_token_id, device, dtype, with_entropy)

    def _start(self, tokenizer, prompt, row: dict) -> _Episode:
        """A fresh episode: its environment made and reset with the row, the prompt encoded with the tools."""
        tools = {t.name: t.func for t in self.tools}
        env = None
        if self.environment_factory is not None:
            env = self.environment_factory()
            observation = env.reset(**row)
            if observation is not None:
                if not isinstance(observation, str):
                    raise ValueError(f"environment {type(env).__name__}.reset returned {type(observation).__name__}; "
                                     "expected None or a string (the first observation, appended to the prompt)")
                prompt = append_observation(prompt, observation)
            tools.update({f.__name__: f for f in environment_methods(env)})
        chat = is_chat(prompt)
        return _Episode(prompt=prompt, prompt_ids=self.encode(tokenizer, prompt), chat=chat, tools=tools, env=env)

    def encode(self, tokenizer, prompt) -> list[int]:
        """Token ids of a prompt as ``grpokit.training.data.encode_prompt`` makes them, with the tool schemas
        given to the chat template (``apply_chat_template(tools=...)``), and cut to ``max_prompt_length``."""
        if is_chat(prompt):
            if getattr(tokenizer, "chat_template", None) is None:
                raise ValueError("the prompts are chat messages but the tokenizer has no chat_template")
            text = tokenizer.apply_chat_template(prompt, tools=self.schemas or None, tokenize=False,
                                                 add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        elif isinstance(prompt, str):
            ids = tokenizer(prompt)["input_ids"]
        else:
            raise ValueError(f"a prompt must be a string or a list of chat messages, got {type(prompt).__name__}")
        if not ids:
            raise ValueError(f"prompt {prompt!r} encodes to no tokens")
        limit = self.max_prompt_length
        if limit is None or len(ids) <= limit:
            return ids
        if self.prompt_truncation == "error":
            raise ValueError(f"a prompt has {len(ids)} tokens with the tools rendered in, more than max_prompt_length="
                             f"{limit} (prompt_truncation: error): {prompt!r}")
        return ids[-limit:]

    def _model_turn(self, e: _Episode, turn: list[int], logps: list[float], entropy: list[float] | None, text: str,
                    eos: set[int], budget: int, tokenizer) -> bool:
        """Add one sampled model turn to ``e``, then run its tool calls; returns whether the episode goes on."""
        n = len(turn)
        e.last_start, e.last_text, e.turns = len(e.ids), text, e.turns + 1
        e.ids += turn
        e.model_mask += [1] * n
        e.logps += logps[:n]
        e.entropy += entropy[:n] if entropy is not None else [0.0] * n
        message = {"role": "assistant", "content": text}
        e.messages.append(message)
        if turn[-1] not in eos and len(e.ids) >= budget:  # the budget cut this turn: nothing more fits
            e.truncated = True
            return False
        try:
            calls, results = self.parsers[e.chat](text), []
        except ValueError as error:  # an unreadable call: the model reads why
            calls, results = [], [failure("unknown", f"could not parse the tool call: {error}")]
        if calls:
            message["tool_calls"] = [{"type": "function", "function": call} for call in calls]
        if not (calls or results) or (self.max_rounds is not None and e.rounds >= self.max_rounds):
            return False
        results += [call_tool(call, e.tools, self.tool_timeout) for call in calls]
        e.calls += len(results)
        e.failures += sum(r.failed for r in results)
        tool_messages = [{"role": "tool", "name": r.name, "content": r.content} for r in results]
        env_ids = self.render(tokenizer, tool_messages, e.chat)
        if e.chat and turn[-1] not in eos and tokenizer.eos_token_id is not None:
            env_ids = [tokenizer.eos_token_id, *env_ids]  # a turn cut by max_turn_length: the template's end
        if len(e.ids) + len(env_ids) >= budget:  # no room for the result and a model token after it: dropped
            e.truncated = True
            return False
        e.ids += env_ids
        e.model_mask += [0] * len(env_ids)
        e.logps += [0.0] * len(env_ids)
        e.entropy += [0.0] * len(env_ids)
        e.messages += tool_messages
        e.rounds += 1
        return not (e.env is not None and getattr(e.env, "done", False))

    def render(self, tokenizer, tool_messages: list[dict], chat: bool) -> list[int]:
        """Token ids of one round's tool messages, to append after the model's turn: the chat template's
        rendering (with the next assistant turn's opening), or ``PLAIN_TOOL_MESSAGE`` for string prompts."""
        if not chat:
            text = "".join(PLAIN_TOOL_MESSAGE.format(**m) for m in tool_messages)
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = tool_suffix_ids(tokenizer, tool_messages)
        if not self._checked_template:  # a template that drops tool messages would train on an empty round
            shown = tokenizer.decode(ids)
            missing = [m["content"] for m in tool_messages if m["content"] not in shown]
            if missing:
                raise ValueError(f"the tokenizer's chat template does not render tool messages (tool result "
                                 f"{missing[0]!r} is not in {shown!r}); use a template with a tool role")
            self._checked_template = True
        return ids

    def _episodes(self, episodes: list[_Episode], tokenizer, pad_id: int, device, dtype,
                  with_entropy: bool) -> Episodes:
        B, C = len(episodes), max(len(e.ids) for e in episodes)
        completion_ids = torch.full((B, C), pad_id, dtype=torch.long)
        completion_mask = torch.zeros(B, C, dtype=torch.long)
        model_mask = torch.zeros(B, C, dtype=torch.long)
        logps = torch.zeros(B, C, dtype=dtype)
        entropy = torch.zeros(B, C, dtype=dtype)
        for i, e in enumerate(episodes):
            n = len(e.ids)
            completion_ids[i, :n] = torch.tensor(e.ids)
            completion_mask[i, :n] = 1
            model_mask[i, :n] = torch.tensor(e.model_mask)
            logps[i, :n] = torch.tensor(e.logps, dtype=dtype)
            entropy[i, :n] = torch.tensor(e.entropy, dtype=dtype)
        prompt_ids, prompt_mask = left_pad([e.prompt_ids for e in episodes], pad_id)
        texts = tokenizer.batch_decode([e.ids for e in episodes], skip_special_tokens=True)
        rollout = Rollout(
            prompt_ids=prompt_ids.to(device), prompt_mask=prompt_mask.to(device),
            completion_ids=completion_ids.to(device), completion_mask=completion_mask.to(device),
            is_truncated=torch.tensor([e.truncated for e in episodes], device=device),
            sampling_logps=logps.to(device), texts=texts,
            sampling_entropy=entropy.to(device) if with_entropy else None, model_mask=model_mask.to(device))
        columns = {"messages": [conversation(e.prompt) + e.messages for e in episodes]}
        if self.environment_factory is not None:
            columns["environments"] = [e.env for e in episodes]
        completions = [list(e.messages) if e.chat else e.last_text for e in episodes]
        offsets = [len(tokenizer.decode(e.ids[:e.last_start], skip_special_tokens=True)) for e in episodes]
        model_tokens = sum(sum(e.model_mask) for e in episodes)
        totals = {"episodes": float(B), "turns": float(sum(e.turns for e in episodes)),
                  "tool_calls": float(sum(e.calls for e in episodes)),
                  "tool_failures": float(sum(e.failures for e in episodes)), "model_tokens": float(model_tokens),
                  "environment_tokens": float(sum(len(e.ids) for e in episodes) - model_tokens)}
        return Episodes(rollout=rollout, prompts=[e.prompt for e in episodes], completions=completions,
                        columns=columns, last_texts=[e.last_text for e in episodes], last_offsets=offsets,
                        totals=totals)


def append_observation(prompt, observation: str):
    """An environment's first observation appended to the prompt (TRL: to the last message's content)."""
    if is_chat(prompt):
        last = prompt[-1]
        return [*prompt[:-1], {**last, "content": last.get("content", "") + observation}]
    return prompt + observation


def conversation(prompt) -> list[dict]:
    """A prompt as chat messages (a string prompt is one ``user`` message)."""
    return list(prompt) if is_chat(prompt) else [{"role": "user", "content": prompt}]


def tool_suffix_ids(tokenizer, tool_messages: list[dict]) -> list[int]:
    """The chat template's tokens for ``tool_messages`` after an assistant turn, up to the next assistant turn's
    opening: the rendering of a short conversation with and without them, the shorter cut after its last EOS
    (templates that put a newline after an assistant's end-of-turn token; TRL's ``_get_tool_suffix_ids``)."""
    calls = [{"type": "function", "function": {"name": tool_messages[0]["name"], "arguments": {}}}]
    dummy = [{"role": "user", "content": "dummy"}, {"role": "assistant", "content": "", "tool_calls": calls}]
    prefix = tokenizer.apply_chat_template(dummy, add_generation_prompt=False, tokenize=True, return_dict=False)
    full = tokenizer.apply_chat_template(dummy + tool_messages, add_generation_prompt=True, tokenize=True,
                                         return_dict=False)
    ends = [i for i, t in enumerate(prefix) if t == tokenizer.eos_token_id]
    if ends:
        prefix = prefix[:ends[-1] + 1]
    if full[:len(prefix)] != prefix:
        raise ValueError("the chat template renders an assistant turn differently when tool messages follow it, "
                         "so tool messages cannot be appended to the sampled tokens")
    return full[len(prefix):]


def episodes_from_rollout_func(output: dict, prompts: list, group_size: int, tokenizer,
                               params: SamplingParams) -> Episodes:
    """A ``rollout_func``'s output (TRL's contract: per completion ``prompt_ids``, ``completion_ids`` and
    ``logprobs`` lists, optional ``env_mask``, other keys for the reward functions) as ``Episodes``.
    ``is_truncated`` as TRL: the last token is no EOS."""
    if not isinstance(output, dict):
        raise ValueError(f"rollout_func must return a dict with keys {', '.join(ROLLOUT_FUNC_KEYS)}, "
                         f"got {type(output).__name__}")
    missing = [k for k in ROLLOUT_FUNC_KEYS if k not in output]
    if missing:
        raise ValueError(f"rollout_func must return keys {missing} in its output dict")
    n = len(prompts)
    for key, value in output.items():
        if len(value) != n:
            raise ValueError(f"rollout_func returned {len(value)} {key!r} for {n // group_size} prompts x "
                             f"{group_size} generations = {n} completions")
    pad = params.pad_token_id
    completion_lists = [list(c) for c in output["completion_ids"]]
    if any(not c for c in completion_lists):
        raise ValueError("rollout_func returned an empty completion; every completion needs a token")
    B, C = n, max(len(c) for c in completion_lists)
    completion_ids = torch.full((B, C), pad, dtype=torch.long)
    completion_mask = torch.zeros(B, C, dtype=torch.long)
    logps = torch.zeros(B, C, dtype=torch.float32)
    env_mask = output.get("env_mask")
    model_mask = None if env_mask is None else torch.zeros(B, C, dtype=torch.long)
    for i, ids in enumerate(completion_lists):
        completion_ids[i, :len(ids)] = torch.tensor(ids)
        completion_mask[i, :len(ids)] = 1
        logps[i, :len(ids)] = torch.tensor([float("nan") if x is None else float(x) for x in output["logprobs"][i]])
        if model_mask is not None:
            model_mask[i, :len(ids)] = torch.tensor(list(env_mask[i]))
    prompt_ids, prompt_mask = left_pad([list(p) for p in output["prompt_ids"]], pad)
    texts = tokenizer.batch_decode(completion_lists, skip_special_tokens=True)
    eos = set(params.eos_token_ids)
    rollout = Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                      completion_mask=completion_mask, is_truncated=torch.tensor([c[-1] not in eos
                                                                                  for c in completion_lists]),
                      sampling_logps=logps, texts=texts, model_mask=model_mask)
    columns = {k: list(v) for k, v in output.items() if k not in (*ROLLOUT_FUNC_KEYS, "env_mask")}
    columns.setdefault("messages", [conversation(p) + [{"role": "assistant", "content": t}]
                                    for p, t in zip(prompts, texts)])
    completions = [[{"role": "assistant", "content": t}] if is_chat(p) else t for p, t in zip(prompts, texts)]
    model_tokens = float(completion_mask.sum() if model_mask is None else model_mask.sum())
    totals = {"episodes": float(B), "turns": 0.0, "tool_calls": 0.0, "tool_failures": 0.0,
              "model_tokens": model_tokens, "environment_tokens": float(completion_mask.sum()) - model_tokens}
    return Episodes(rollout=rollout, prompts=list(prompts), completions=completions, columns=columns,
                    last_texts=texts, last_offsets=[0] * B, totals=totals)


def make_sampler(args, *, tools=None, environment_factory=None, rollout_func=None) -> MultiTurnSampler | None:
    """The sampler of a ``GRPOConfig`` and ``GRPOTrainer``'s ``tools`` / ``environment_factory`` /
    ``rollout_func``; ``None`` when none is given (single-turn rollouts)."""
    if not tools and environment_factory is None and rollout_func is None:
        return None
    return MultiTurnSampler(tools=tools, environment_factory=environment_factory, rollout_func=rollout_func,
                            tool_call_parser=args.tool_call_parser,
                            max_tool_calling_iterations=args.max_tool_calling_iterations,
                            max_turn_length=args.max_turn_length, tool_timeout=args.tool_timeout,
                            max_prompt_length=args.max_prompt_length, prompt_truncation=args.prompt_truncation)


