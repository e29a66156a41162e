"""A model seen the way evaluations see it: score text, generate text, hold a conversation.

The three questions every evaluation asks of a language model (they are also the three
methods of lm-evaluation-harness's `LM`, see `lmstack.eval.harness`):
  loglikelihood(context, continuation) -> log p(continuation | context) and whether greedy
      decoding would have produced it (multiple choice, cloze ranking);
  rolling(text) -> log p(text), every token scored once with as much context as fits
      (perplexity, bits per byte);
  generate(prompts, until) / chat(conversations) -> text (generative tasks with a checker).
Everything is batched: scoring pads rows to the longest and runs one forward per batch;
generation goes through the engine's batched decode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lmstack.chatformat import chat_format
from lmstack.device import pick_device
from lmstack.engine import for_inference, generate_batch
from lmstack.modelio import load_model_and_tokenizer
from lmstack.quant import quantized_kind
from lmstack.tokenizer import Tokenizer
from lmstack.toolloop import ToolLoop
from lmstack.utils import UserError


@dataclass
class Reply:
    """One conversation's assistant turn, tool rounds included."""
    text: str  # the final assistant message's content
    closed: bool  # it ended its turn with <|end|> (chat-format compliance)
    messages: list[dict] = field(default_factory=list)  # the new messages (tool calls and results)
    tool_calls: int = 0


class ModelLM:
    """A model and its tokenizer, for evaluation. `batch_size` rows per forward pass."""

    def __init__(self, model, tok: Tokenizer, batch_size: int = 32, name: str = "model"):
        self.model, self.tok, self.batch_size, self.name = model, tok, batch_size, name
        self.fmt = chat_format(tok)
        self.ctx = model.cfg.max_seq_len
        self.device = next(model.parameters()).device

    @classmethod
    def load(cls, model_dir, dtype: str = "auto", device: str = "auto", batch_size: int = 32) -> "ModelLM":
        net, tok = load_model_and_tokenizer(model_dir, pick_device(device))
        return cls(for_inference(net, dtype), tok, batch_size, name=str(model_dir))

    @property
    def dtype(self) -> str:
        return quantized_kind(self.model) or str(next(self.model.parameters()).dtype).removeprefix("torch.")

    # --- scoring ------------------------------------------------------------------------------

    @torch.inference_mode()
    def loglikelihood_ids(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) -> (sum of the continuation's log-probs, greedy?).
        A context too long for the window loses its oldest tokens; the continuation is kept."""
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        rows = []
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                raise ValueError("loglikelihood needs a non-empty continuation")
            if len(cont) > self.ctx:
                raise UserError(f"a continuation of {len(cont)} tokens does not fit the context of {self.ctx}")
            seq = (list(ctx) + list(cont))[-(self.ctx + 1):]
            rows.append((i, seq, len(cont)))
        rows.sort(key=lambda r: -len(r[1]))  # similar lengths together: less padding
        for b in range(0, len(rows), self.batch_size):
            chunk = rows[b:b + self.batch_size]
            width = max(len(s) for _, s, _ in chunk) - 1
            # Right padding: causal attention never lets a real token see the pads after it.
            x = torch.full((len(chunk), width), self.tok.pad_id, dtype=torch.long)
            for j, (_, seq, _) in enumerate(chunk):
                x[j, :len(seq) - 1] = torch.tensor(seq[:-1])
            logits = self.model(x.to(self.device))
            for j, (i, seq, n) in enumerate(chunk):
                start = len(seq) - 1 - n  # position predicting the first continuation token
                target = torch.tensor(seq[-n:], device=self.device)
                # log-softmax of the scored positions only: a batch's full fp32 log-probs
                # would be batch x width x vocab floats.
                lp = torch.log_softmax(logits[j, start:start + n].float(), dim=-1)
                out[i] = (float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
        return out  # type: ignore[return-value]

    def split_pair(self, context: str, continuation: str, head: list[int] | None = None):
        """Text pair -> (context ids, continuation ids), tokenized as one string (as the model saw
        text in training) and split where the context ends; a space ending the context moves to
        the continuation. `head`: ids before the context (default: the tokenizer's scoring_head, BOS
        or EOS; a rendered chat prompt)."""
        head = self.tok.scoring_head if head is None else list(head)
        if context and context[-1] == " ":
            n = len(context) - len(context.rstrip(" "))
            context, continuation = context[:-n], context[-n:] + continuation
        whole = self.tok.encode(context + continuation)
        ctx_ids = self.tok.encode(context)
        k = len(ctx_ids)
        if whole[:k] != ctx_ids:  # a token spans the boundary: score the continuation on its own
            return head + ctx_ids, self.tok.encode(continuation)
        return head + ctx_ids, whole[k:]

    def loglikelihood(self, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        return self.loglikelihood_ids([self.split_pair(c, x) for c, x in pairs])

    @torch.inference_mode()
    def rolling_ids(self, docs: list[list[int]]) -> list[tuple[float, int]]:
        """Each document's (total log-prob, tokens scored): every token after the first (BOS)
        predicted once, windows of the full context, later windows overlapping so that each
        prediction still sees up to a whole context of history."""
        pairs, owner = [], []
        for d, ids in enumerate(docs):
            done = 1
            while done < len(ids):
                end = min(done + self.ctx, len(ids))
                start = max(0, end - self.ctx - 1)
                pairs.append((ids[start:done], ids[done:end]))
                owner.append(d)
                done = end
        scores = self.loglikelihood_ids(pairs) if pairs else []
        totals = [[0.0, 0] for _ in docs]
        for d, (lp, _), (_, cont) in zip(owner, scores, pairs):
            totals[d][0] += lp
            totals[d][1] += len(cont)
        return [(t[0], t[1]) for t in totals]

    # --- generation ---------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], max_tokens: int = 64, until=(), stop_ids=(),
                 temperature: float = 0.0, seed: int = 0):
        """Continuations of id prompts (in batches), cut at the first `until` string: greedy, or
        sampled at `temperature` (seeded: the same call gives the same samples)."""
        # Batch prompts of similar length together: rows are left-padded to the longest.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out = [None] * len(prompts)
        for b in range(0, len(order), self.batch_size):
            chunk = order[b:b + self.batch_size]
            done = generate_batch(self.model, [prompts[i] for i in chunk], max_tokens, temperature=temperature,
                                  seed=seed + b, stop_strings=tuple(until), stop_ids=tuple(stop_ids),
                                  tokenizer=self.tok, truncate="left")
            for i, c in zip(chunk, done):
                out[i] = c
        return out

    def chat(self, conversations: list[list[dict]], max_tokens: int = 64, tools=None,
             max_tool_rounds: int = 2, temperature: float = 0.0, seed: int = 0) -> list[Reply]:
        """One assistant turn for each conversation, batched (greedy, or sampled at `temperature`
        with `seed`). With a tool registry, the rows that called a tool get its result and
        continue, together, for up to `max_tool_rounds` more rounds (THE tool loop, as
        `lmstack.chat.stream_chat` runs it for one)."""
        loop = ToolLoop(self.fmt, conversations, tools, max_tool_rounds, max_tokens)
        while todo := loop.next_round():
            results = self.generate([loop.prompt(i) for i in todo], max_tokens, stop_ids=self.fmt.stop_ids,
                                    temperature=temperature, seed=seed + 7919 * loop.round)
            for i, c in zip(todo, results):
                loop.add(i, c.ids, c.stop, c.finish_reason)
        return [Reply(t.text, t.closed, t.new, t.ran) for t in loop.turns]
