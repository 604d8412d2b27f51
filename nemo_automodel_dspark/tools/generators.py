"""Response generators for `regenerate`: the target loaded locally (batched HF `generate`) or an OpenAI-compatible
server. Both map a list of prompts to one `Generation` per prompt and never raise for a single bad row."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, cast

from nemo_automodel_dspark.data.chat import split_reasoning
from nemo_automodel_dspark.data.render import render_prompt, resolve_chat_template


@dataclass
class Generation:
    content: str = ""
    reasoning: str | None = None
    truncated: bool = False  # stopped at max_new_tokens before an end-of-sequence token
    error: str | None = None  # set when the row must be skipped
    token_ids: tuple[list[int], list[int]] | None = None  # (prompt ids read, response ids written incl. the end)


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 → greedy
    top_p: float = 1.0
    max_new_tokens: int = 256
    enable_thinking: bool = False


class LocalGenerator:
    """The target on this machine: left-padded batches through `model.generate`, cut at the first EOS."""

    def __init__(
        self,
        target: str,
        sampling: SamplingConfig,
        *,
        batch_size: int,
        device: str = "auto",
        chat_template: str | None = None,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(target)
        self.tokenizer.padding_side = "left"
        self.template = resolve_chat_template(self.tokenizer, chat_template)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # Any: transformers' own annotations of `to`/`generate` confuse type checkers
        self.model: Any = cast(Any, AutoModelForCausalLM.from_pretrained(target, dtype=dtype)).to(self.device).eval()
        self.sampling, self.batch_size = sampling, batch_size
        self.generation_config = self._generation_config()
        eos = self.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)

    def _generation_config(self):
        from transformers import GenerationConfig

        base = self.model.generation_config
        sampling = {}
        if self.sampling.temperature > 0:  # exactly temperature + top-p, whatever the target's defaults say
            sampling = {"temperature": self.sampling.temperature, "top_p": self.sampling.top_p, "top_k": 0}
        return GenerationConfig(
            do_sample=bool(sampling),
            **sampling,
            max_new_tokens=self.sampling.max_new_tokens,
            eos_token_id=base.eos_token_id if base.eos_token_id is not None else self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )

    def render(self, prompt: list[dict]) -> list[int]:
        return render_prompt(self.tokenizer, prompt, self.template, enable_thinking=self.sampling.enable_thinking)

    def __call__(self, prompts: list[list[dict]], *, seed: int) -> list[Generation]:
        results: list[Generation | None] = [None] * len(prompts)
        ready: list[tuple[int, list[int]]] = []
        for i, prompt in enumerate(prompts):
            try:
                ids = self.render(prompt)
            except Exception as err:  # a template may reject a conversation shape: skip the row, not the run
                results[i] = Generation(error=f"chat template failed: {err}")
                continue
            limit = self.max_positions
            if limit is not None and len(ids) + self.sampling.max_new_tokens > limit:
                results[i] = Generation(error=f"prompt too long: {len(ids)} tokens + max_new_tokens > {limit}")
            else:
                ready.append((i, ids))
        for start in range(0, len(ready), self.batch_size):
            batch = ready[start : start + self.batch_size]
            for (i, _), generation in zip(batch, self._generate([ids for _, ids in batch], seed + start), strict=True):
                results[i] = generation
        return [r if r is not None else Generation(error="not generated") for r in results]

    def _generate(self, batch: list[list[int]], seed: int) -> list[Generation]:
        import torch

        padded = self.tokenizer.pad({"input_ids": batch}, padding=True, return_tensors="pt").to(self.device)
        torch.manual_seed(seed)  # HF sampling draws from the global generator: seed it per batch for resumability
        with torch.no_grad():
            out = self.model.generate(**padded, generation_config=self.generation_config)  # [B, P + T]
        new_tokens = out[:, padded["input_ids"].shape[1] :].tolist()
        return [self._decode(prompt, tokens) for prompt, tokens in zip(batch, new_tokens, strict=True)]

    def _decode(self, prompt: list[int], tokens: list[int]) -> Generation:
        end = next((j for j, t in enumerate(tokens) if t in self.eos_ids), None)
        text = str(self.tokenizer.decode(tokens[:end], skip_special_tokens=True))
        reasoning, content = split_reasoning(text)
        response = tokens if end is None else tokens[: end + 1]  # the end token is generated too: keep it
        return Generation(content, reasoning, truncated=end is None, token_ids=(list(prompt), response))


class ServerGenerator:
    """An OpenAI-compatible `/v1/chat/completions` endpoint, with bounded concurrency and exponential back-off."""

    def __init__(
        self,
        url: str,
        model: str,
        sampling: SamplingConfig,
        *,
        concurrency: int = 8,
        max_retries: int = 4,
        backoff_s: float = 1.0,
        timeout_s: float = 600.0,
    ) -> None:
        self.url = chat_completions_url(url)
        self.model, self.sampling = model, sampling
        self.concurrency, self.max_retries, self.backoff_s, self.timeout_s = (
            concurrency,
            max_retries,
            backoff_s,
            timeout_s,
        )

    def __call__(self, prompts: list[list[dict]], *, seed: int) -> list[Generation]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self._one, prompts, range(seed, seed + len(prompts))))

    def _one(self, prompt: list[dict], seed: int) -> Generation:
        body = {
            "model": self.model,
            "messages": prompt,
            "temperature": self.sampling.temperature,
            "top_p": self.sampling.top_p,
            "max_tokens": self.sampling.max_new_tokens,
            "seed": seed,
            "chat_template_kwargs": {"enable_thinking": self.sampling.enable_thinking},
        }
        last_error = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                return parse_completion(self._post(body))
            except urllib.error.HTTPError as err:
                last_error = f"HTTP {err.code}: {err.read()[:200].decode('utf-8', 'replace')}"
                if 400 <= err.code < 500 and err.code not in (408, 429):
                    break  # the request itself is wrong: retrying cannot help
            except (OSError, ValueError, KeyError, IndexError, TypeError) as err:
                last_error = f"{type(err).__name__}: {err}"
        return Generation(error=f"server failed after {attempt + 1} attempt(s): {last_error}")

    def _post(self, body: dict) -> dict:
        request = urllib.request.Request(
            self.url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            return json.loads(response.read())


def chat_completions_url(url: str) -> str:
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


def parse_completion(payload: dict) -> Generation:
    choice = payload["choices"][0]
    message = choice["message"]
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    inline_reasoning, content = split_reasoning(message.get("content") or "")
    return Generation(
        content=content, reasoning=reasoning or inline_reasoning, truncated=choice.get("finish_reason") == "length"
    )
