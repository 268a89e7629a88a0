"""The rollout engine: one decode loop for every stage that samples (PPO now; GRPO, chat and the
evaluation tables next).

Why a loop of our own rather than transformers' `generate`: RL needs the log-probability of every
sampled token *as the sampler saw it* (to measure how far the sampler drifts from the training
forward, `ppo/rollout_logprob_gap`), and a decode step that does not wait for the host: `generate`
tests "all rows finished?" after every token (a device sync per token). Here the end-of-sequence
test runs on the device and the host looks only every `check_every` tokens.

The loop is plain: one prefill forward over the left-padded prompts (the LM head at the last
position only), then one forward per token on the KV cache, sampling from softmax(logits / T)
restricted to the top-p nucleus (top-k off: PPO's ratio assumes the actor's own distribution).
Greedy decoding is argmax and equals `generate(do_sample=False)` token for token
(tests/test_rollout.py). Sampling draws from the engine's own torch.Generator, seeded, so a batch's
samples are reproducible from (seed, call) and independent of evaluation's stream.

Under ZeRO-3 without a gathered actor every rank must run the same number of forwards: `synced`
makes the host check an all-reduce, and a rank that finished keeps decoding padding until all have.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from forgepipe.stages.ppo.experience import generation_context, position_ids_from_mask, response_mask


@dataclass
class Rollout:
    """Sampled responses to a batch of left-padded prompts; per-token fields are [B, R]."""

    sequences: torch.Tensor  # [B, P + R] prompt + response ids (padding after each row's EOS)
    attention_mask: torch.Tensor  # [B, P + R] prompt padding and tokens after EOS are 0
    action_mask: torch.Tensor  # [B, R] 1 up to and including the first EOS
    logprobs: torch.Tensor  # [B, R] log-prob of each sampled token under the sampler (0 after EOS)
    prompt_len: int  # P


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False
    check_every: int = 8  # tokens between the host's "all finished?" checks (the only host syncs)


def nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits with every token outside the smallest set of probability >= top_p set to -inf (the
    most likely token always stays)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token already >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def choose(logits: torch.Tensor, s: SamplingSettings, generator: torch.Generator | None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(token [B], its log-prob [B]) from last-position logits [B, V]: argmax (greedy), or a draw from
    softmax(logits / T) within the top-p nucleus. The log-prob is under softmax(logits / T) without the
    nucleus cut, the distribution the training forward recomputes (experience.actor_logprobs)."""
    scaled = logits.float() if s.greedy else logits.float() / s.temperature
    logp = scaled.log_softmax(dim=-1)
    if s.greedy:
        token = scaled.argmax(dim=-1)
    else:
        probs = nucleus(scaled, s.top_p).softmax(dim=-1)
        token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return token, logp.gather(-1, token[:, None]).squeeze(-1)


class RolloutEngine:
    """Generate for a batch of prompts with a causal LM (a DeepSpeed engine or a plain module).

    `gather`: under ZeRO-3, gather the whole actor once for the call (experience.generation_context);
    `synced`: ranks decode in lockstep (ZeRO-3 without gathering). `refresh()` is called after each
    optimizer step: this engine reads the live weights, so it has nothing to copy (an inference copy or
    an external server would sync here)."""

    def __init__(self, model, *, eos_token_id: int, pad_token_id: int, seed: int = 0,
                 gather: bool = False, synced: bool = False, cache: str = "dynamic", compile_decode: bool = False):
        self.model, self.eos, self.pad = model, eos_token_id, pad_token_id
        self.gather, self.synced = gather, synced
        self.seed, self.calls = seed, 0
        if cache not in ("dynamic", "static"):
            raise ValueError(f"cache {cache!r}: dynamic or static")
        # static: the KV cache allocated once per call at prompt + max_new_tokens, and every decode step's
        # inputs of one shape, so that compile_decode can capture the step (CUDA/HIP graphs through
        # torch.compile's reduce-overhead mode) instead of launching each layer's kernels from Python.
        self.cache, self.compile_decode = cache, compile_decode and cache == "static"
        self._compiled: dict[int, object] = {}
        self.cache_bytes = 0  # the KV cache of the last call (logged by the stage)

    def refresh(self) -> None:
        """After an optimizer step: nothing to do, the loop decodes with the trained weights themselves."""

    def _generator(self, device: torch.device, call: int | None) -> torch.Generator:
        """A stream per call, seeded by (seed, call): reproducible, and untouched by anything else. `call`
        (e.g. the PPO step) makes a resumed run draw what an uninterrupted one drew; else calls are counted."""
        if call is None:
            call, self.calls = self.calls, self.calls + 1
        generator = torch.Generator(device=device)
        generator.manual_seed((self.seed * 1_000_003 + call) % 2**63)
        return generator

    def _all_finished(self, finished: torch.Tensor) -> bool:
        """Whether every row (on every rank, when synced) has ended: the loop's one host sync."""
        if not self.synced:
            return bool(finished.all())
        from forgepipe import distributed

        return bool(distributed.all_reduce((~finished).sum().float()) == 0)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, s: SamplingSettings,
                 call: int | None = None) -> Rollout:
        generator = None if s.greedy else self._generator(input_ids.device, call)
        with generation_context(self.model, self.gather) as module, torch.compiler.set_stance("force_eager"):
            return self._decode(module, input_ids, attention_mask.long(), s, generator)

    def _step_fn(self, module):
        """The decode step: the module's forward, compiled once per module when asked and possible."""
        if not self.compile_decode:
            return module
        key = id(module)
        if key not in self._compiled:  # graphs on a GPU (ROCm's torch answers cuda too); plain inductor elsewhere
            mode = "reduce-overhead" if torch.cuda.is_available() else None
            self._compiled[key] = torch.compile(module, mode=mode, fullgraph=False, dynamic=False)
        return self._compiled[key]

    def _decode(self, module, input_ids: torch.Tensor, mask: torch.Tensor, s: SamplingSettings,
                generator: torch.Generator | None) -> Rollout:
        from transformers import DynamicCache, StaticCache

        device, batch, prompt_len = input_ids.device, input_ids.shape[0], input_ids.shape[1]
        static = self.cache == "static"
        total = prompt_len + s.max_new_tokens
        if static:  # one shape for every step: the whole cache's mask (the causal mask hides unwritten slots)
            cache = StaticCache(config=module.config, max_cache_len=total)
            mask = torch.cat([mask, mask.new_ones(batch, s.max_new_tokens)], dim=1)
            prefill_mask = mask
        else:
            cache, prefill_mask = DynamicCache(config=module.config), mask
        positions = position_ids_from_mask(mask[:, :prompt_len])
        extra = {"cache_position": torch.arange(prompt_len, device=device)} if static else {}
        out = module(input_ids=input_ids, attention_mask=prefill_mask, position_ids=positions, past_key_values=cache,
                     use_cache=True, logits_to_keep=1, **extra)
        step_fn = self._step_fn(module)
        next_position = positions[:, -1:] + 1
        cache_position = torch.full((1,), prompt_len, device=device, dtype=torch.long)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        tokens, logprobs = [], []
        for step in range(s.max_new_tokens):
            token, logp = choose(out.logits[:, -1], s, generator)
            token = token.masked_fill(finished, self.pad)  # a finished row decodes padding
            logprobs.append(logp.masked_fill(finished, 0.0))
            tokens.append(token)
            finished = finished | (token == self.eos)
            last = step + 1 == s.max_new_tokens
            if last or ((step + 1) % s.check_every == 0 and self._all_finished(finished)):
                break
            if static:
                # generate() runs under the force_eager stance (a --compile'd model decodes eagerly); the
                # decode step compiled here for its one shape is the exception
                with torch.compiler.set_stance("default" if self.compile_decode else "force_eager"):
                    out = step_fn(input_ids=token[:, None], attention_mask=mask, position_ids=next_position,
                                  past_key_values=cache, use_cache=True, cache_position=cache_position)
                cache_position = cache_position + 1
            else:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                out = step_fn(input_ids=token[:, None], attention_mask=mask, position_ids=next_position,
                              past_key_values=cache, use_cache=True)
            next_position = next_position + 1
        self.cache_bytes = sum(t.numel() * t.element_size() for layer in getattr(cache, "layers", [])
                               for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                               if torch.is_tensor(t))
        response = torch.stack(tokens, dim=1)
        actions = response_mask(response, self.eos)
        return Rollout(sequences=torch.cat([input_ids, response], dim=1),
                       attention_mask=torch.cat([mask[:, :prompt_len], actions], dim=1),
                       action_mask=actions, logprobs=torch.stack(logprobs, dim=1) * actions, prompt_len=prompt_len)
