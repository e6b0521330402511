"""The inference engine's Python face: tokenization, chat templates, stop strings and
streaming around the C++ engine (moa_engine._C.Engine), which owns the model forward,
the KV cache, continuous batching and sampling.

    from moa_engine import Engine
    engine = Engine()                       # the embedded default model, SmolLM2-135M-Instruct
    [c] = engine.generate(["What is the capital of France?"], chat=True, max_new_tokens=32)
    c.text, c.token_ids, c.finish_reason
    engine.generate(prompts, SamplingParams(temperature=0.7, top_p=0.9, seed=1))

The C++ engine works while the GIL is released, so other Python threads run meanwhile.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moa_engine import _C
from moa_engine.moa_format import MoADir
from moa_engine.models import DEFAULT_MODEL, default_gguf_path, gguf_tokenizer_dir, resolve_model
from moa_engine.routing import BASE, ROUTE

FINISH_REASONS = ("stop", "length", "cancelled", "error")
# Engine(quantization=...): "auto" (a .gguf file keeps its types), None (float32 throughout),
# or a GGML type the float matrices are quantized to on load.
QUANTIZATIONS = ("auto", None, "q8_0", "q4_0", "q4_1", "q4_k")


def _stop_tuple(stop) -> tuple[str, ...]:
    """SamplingParams.stop as a tuple: None, one string, or a list or tuple of strings."""
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, (list, tuple)) else None
    if stops is None or any(not isinstance(s, str) or not s for s in stops):
        raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    return stops


@dataclass(frozen=True)
class SamplingParams:
    """How a request is decoded: the C++ engine's moa::SamplingParams (temperature, top_k,
    top_p, seed) with the request's max_new_tokens, stop strings and ignore_eos, as vLLM's
    SamplingParams holds them.

    max_new_tokens: the most tokens generated (EOS and stop ids included).
    temperature: 0 is greedy; otherwise sampling after temperature, top_k (0: off) and
        top_p (1: off), in that order.
    seed: every request's random stream starts from it, so a prompt's output does not
        depend on what else is in the batch; None draws a random seed.
    stop: strings that end a completion (one string or several); the text is cut before the
        first one.
    ignore_eos: keep generating past the model's EOS ids.

    The engine checks the ranges when a request is submitted (ValueError naming the field).
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        object.__setattr__(self, "stop", _stop_tuple(self.stop))
        if self.seed is not None and not 0 <= int(self.seed) < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")

    @classmethod
    def of(cls, sampling: SamplingParams | None = None, **fields) -> SamplingParams:
        """`sampling` (default: SamplingParams()) with the given fields replaced: the one place
        where generate() and stream() turn their convenience keywords into parameters."""
        base = cls() if sampling is None else sampling
        if not isinstance(base, cls):
            raise TypeError(f"sampling: expected a SamplingParams or None, got {type(sampling).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(fields) - set(names))
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {unknown}; the sampling keywords are {names}")
        return dataclasses.replace(base, **fields) if fields else base


@dataclass(frozen=True)
class Completion:
    """One generated sequence.

    text: the decoded generated text (special tokens skipped, cut before a stop string),
        or None when the model folder has no tokenizer.
    token_ids: the generated token ids, EOS and stop-sequence ids included.
    finish_reason: "stop" (EOS id or stop string), "length" (max_new_tokens reached), or
        "error" (the request failed: non-finite logits; `error` says why, and the other
        requests of the batch are unaffected).
    error: why the request failed when finish_reason is "error", else None.
    prompt_token_ids: the prompt as the engine saw it (after the chat template).
    domain: the expert that served it ("base" for none; "mixed" when per-layer routing
        chose different experts in different layers).
    layer_domains: the expert per decoder layer.
    router_probs: when routed, the routers' probabilities per layer, over
        Engine.router_domains; None when the request named its domain.
    """

    text: str | None
    token_ids: list[int]
    finish_reason: str
    prompt_token_ids: list[int] = field(default_factory=list, repr=False)
    domain: str = BASE
    layer_domains: list[str] = field(default_factory=list, repr=False)
    router_probs: list[list[float]] | None = field(default=None, repr=False)
    error: str | None = None


def _base_model_of(moa_dir) -> str | Path | None:
    """The base model a MoA directory names: the default model's name, or a folder
    (relative paths are taken from the MoA directory)."""
    base = moa_dir.config.base_model
    if base in (DEFAULT_MODEL, f"HuggingFaceTB/{DEFAULT_MODEL}"):
        return None
    path = Path(base)
    return path if path.is_absolute() else (moa_dir.path / path)


def _load_tokenizer(folder: Path):
    if not ((folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists()):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


class Engine:
    """A Llama-family model (llama, mistral, qwen2) served by the C++ engine.

    Args:
        model: a local HF folder (config.json + safetensors), a .gguf file, or None for the
            default model (SmolLM2-135M-Instruct, a Q4_1 GGUF file from a PyPI package).
        quantization: "auto" serves a .gguf file natively, each matrix in the file's GGML
            type (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K: weight-only kernels,
            float activations), and an HF folder in float; None converts a .gguf file once
            to float32 safetensors (cached) and serves those. "q8_0", "q4_0", "q4_1" or
            "q4_k" quantizes the float matrices on load (HF folder or .gguf file): the
            layers' projections in that type, the embedding and LM head in Q8_0; a .gguf
            file's quantized matrices keep their types. The default model is its Q4_1 file
            ("auto" on the CPU) or that file's float32 conversion (None, and "auto" on a GPU).
        dtype: "auto" (the checkpoint's), "float32" or "bfloat16" ("float16" on CUDA).
        device: "cpu", or "cuda" / "cuda:N" in a build with CUDA.
        backend: where the forward runs. "auto" (MOA_ENGINE_BACKEND when set, else "cpu"
            on the CPU, "cuda" on a GPU), "cpu" (the CPU kernels, chosen by instruction
            set), "reference" (ATen ops alone on any device: slow, the plain forward the
            others are tested against) or "cuda".
        max_batch: KV-cache slots, i.e. sequences decoded together. More prompts than
            slots are queued and take a slot as soon as one frees (continuous batching).
        max_seq_len: the longest prompt + generation, per sequence.
        max_prefill_tokens: the most prompt tokens admitted in one step (at least one
            prompt is always admitted).
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        experts=None,
        dtype: str = "auto",
        device: str = "cpu",
        max_batch: int = 16,
        max_seq_len: int = 2048,
        max_prefill_tokens: int = 4096,
        routing: str | None = None,
        quantization: str | None = "auto",
        backend: str = "auto",
    ):
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(map(repr, QUANTIZATIONS))}, got {quantization!r}")
        moa_dir = None
        if experts is not None and not isinstance(experts, dict):
            moa_dir = MoADir.load(experts)
            if model is None:
                model = _base_model_of(moa_dir)
        if model is None and quantization == "auto" and str(device).split(":")[0] != "cpu":
            quantization = None  # GGML types are served on the CPU only: off it, the float conversion
        if model is None and quantization is not None:
            model = default_gguf_path()  # its shipped Q4_1 weights, as they are
        gguf = model is not None and Path(model).suffix.lower() == ".gguf" and Path(model).expanduser().is_file()
        native = gguf and quantization is not None
        self.model_path = Path(model).expanduser().resolve() if native else resolve_model(model)
        self._gguf_native = native
        self._core = _C.Engine(
            str(self.model_path),
            dtype=dtype,
            device=device,
            max_batch=max_batch,
            max_seq_len=max_seq_len,
            max_prefill_tokens=max_prefill_tokens,
            quantization="" if quantization in ("auto", None) else quantization,
            backend=backend,
        )
        self.quantized = native or quantization not in ("auto", None)
        self._tokenizer = None
        self._tokenizer_loaded = False
        self.moa_dir = moa_dir
        self._routing = routing
        if moa_dir is not None:
            self._core.load_moa(str(moa_dir.path), routing or "")  # the C++ reader, checked against the model
        elif experts:
            for name, path in experts.items():
                self.add_expert(name, path)
        if routing is not None and not self._core.router_domains:
            raise ValueError(f"routing={routing!r} was given, but the engine has no router")

    # -- experts --------------------------------------------------------------------
    @property
    def experts(self) -> list[str]:
        """The loaded experts' names."""
        return list(self._core.experts)

    @property
    def routing(self) -> str | None:
        """The strategy routed requests use unless they name one ("per_layer", "last", "vote"),
        or None without routers."""
        if not self._core.router_domains:
            return None
        return self._routing or (self.moa_dir.config.router.strategy if self.moa_dir is not None else None)

    @property
    def router_domains(self) -> list[str]:
        """The routers' domains, in the order of Completion.router_probs (empty: no router)."""
        return list(self._core.router_domains)

    def add_expert(self, name: str, path) -> None:
        """Loads a PEFT LoRA folder as the expert `name`, while the engine runs: requests
        from the next step on can name it (and routers that know the name choose it)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"an expert needs a non-empty name, got {name!r}")
        self._core.load_expert(name, str(path))

    def remove_expert(self, name: str) -> None:
        """Unloads an expert. Requests already using it finish with it; new ones cannot
        name it, and routers stop choosing it."""
        self._core.remove_expert(name)

    # -- properties ---------------------------------------------------------------
    @property
    def tokenizer(self):
        """The model folder's HF tokenizer (None if it has none), loaded on first use:
        token-id users never pay its ~150 MB."""
        if not self._tokenizer_loaded:
            folder = gguf_tokenizer_dir(self.model_path) if self._gguf_native else self.model_path
            self._tokenizer = _load_tokenizer(folder)
            self._tokenizer_loaded = True
        return self._tokenizer

    @property
    def config(self) -> dict:
        """The architecture as the engine read it from config.json."""
        return self._core.config

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self._core.dtype)

    @property
    def backend(self) -> str:
        """Where the forward runs: "cpu", "reference" or "cuda"."""
        return self._core.backend

    @property
    def device(self) -> str:
        return self._core.device

    @property
    def max_batch(self) -> int:
        return self._core.max_batch

    @property
    def max_seq_len(self) -> int:
        return self._core.max_seq_len

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights in memory (a tied embedding counted once)."""
        return self._core.weight_bytes

    # -- scoring --------------------------------------------------------------------
    def forward(self, input_ids, domain=None, return_routing: bool = False, route_len=None, routing: str | None = None):
        """Scores whole sequences with the generation forward, experts and routing included.

        input_ids: [B, T] integer tensor (or [T], or a list of equal-length id lists)
        -> logits [B, T, vocab] float32 ([T, vocab] for a 1-D input).
        domain: as in generate(): one value or one per row; None routes each row (or runs the
            base model when there are no experts).
        return_routing: also return each row's routing, as (logits, [RoutingInfo]).
        route_len: None (route over the whole row), or an int or one int per row: route over
            the row's first route_len tokens only, as a request with that prompt is routed at
            prefill; scoring a response then gives the loss of serving it.
        routing: the routing strategy of the routed rows ("per_layer", "last", "vote"; None:
            the engine's), as in generate().
        """
        ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.as_tensor(input_ids)
        one = ids.dim() == 1
        if one:
            ids = ids.unsqueeze(0)
        domains = self._domains(domain, ids.shape[0] if ids.dim() else 0)
        route_lens = [] if route_len is None else self._route_lens(route_len, ids.shape[0] if ids.dim() else 0)
        if routing is not None and not isinstance(routing, str):
            raise ValueError(f"routing: expected a strategy name or None, got {routing!r}")
        if return_routing or route_lens or routing:
            logits, info = self._core.forward_with_routing(ids, domains, route_lens, routing or "")
        else:
            logits, info = self._core.forward(ids, domains), None
        if one:
            logits = logits[0]
        return (logits, info) if return_routing else logits

    def route(self, prompts, routing: str | None = None, chat: bool = False) -> list:
        """How each prompt would be routed, without generating or scoring: the routers' routing
        pass alone (no KV cache, no logits), the cheapest way to inspect or evaluate them.

        prompts: as in generate() (strings, message lists with chat=True, or token-id lists).
        routing: the strategy ("per_layer", "last", "vote"; None: the engine's).
        -> one RoutingInfo per prompt: .domain (the chosen expert; "mixed" when per-layer
        choices differ), .layer_domains and .router_probs ([layer][domain], in the order of
        router_domains), as a Completion reports them."""
        if routing is not None and not isinstance(routing, str):
            raise ValueError(f"routing: expected a strategy name or None, got {routing!r}")
        ids = [self._encode(p, chat) for p in self._prompt_list(prompts)]
        return list(self._core.route(ids, routing or ""))

    @staticmethod
    def _route_lens(route_len, n: int) -> list[int]:
        values = [route_len] if isinstance(route_len, int) else list(route_len)
        if len(values) not in (1, n) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ValueError(f"route_len: expected an int or one int per row ({n}), got {route_len!r}")
        return values

    @staticmethod
    def _domains(domain, n: int) -> list[str]:
        """generate()'s domain argument as one string per request (the C++ engine routes "")."""
        if domain is ROUTE or isinstance(domain, str):
            return [domain or ""] * n
        domains = list(domain)
        if len(domains) != n:
            raise ValueError(f"domain: expected one value or one per prompt ({n}), got {len(domains)}")
        if any(d is not ROUTE and not isinstance(d, str) for d in domains):
            raise ValueError(f"domain: expected names, {BASE!r} or None, got {domain!r}")
        return [d or "" for d in domains]

    # -- generation -----------------------------------------------------------------
    def generate(
        self, prompts, sampling: SamplingParams | None = None, *, chat: bool = False, domain=ROUTE, routing=None, **kw
    ) -> list[Completion]:
        """Generates a completion for every prompt, batched continuously.

        prompts: a list of strings, or a list of token-id lists (a single string is taken
            as a list of one). With chat=True, each string is a user message and the
            model's chat template is applied; a prompt may also be a list of
            {"role", "content"} messages.
        sampling: a SamplingParams for every prompt; keywords (max_new_tokens=...,
            temperature=..., top_k, top_p, seed, stop, ignore_eos) replace its fields.
        domain: the expert for every prompt or one per prompt: an expert's name, BASE
            ("base", no expert) or ROUTE (None: the routers choose at prefill; with no
            experts loaded, the base model). One batch may mix all of these.
        routing: the routing strategy for routed prompts ("per_layer", "last", "vote");
            None uses the MoA directory's.
        Returns a Completion per prompt, in order.
        """
        params = SamplingParams.of(sampling, **kw)
        stops = self._stop_strings(params.stop)
        prompt_ids = [self._encode(p, chat) for p in self._prompt_list(prompts)]
        domains = self._domains(domain, len(prompt_ids))
        stop_ids = self._stop_sequences(stops)  # tokenized once for the whole batch
        requests = [self._request(ids, params, stop_ids, d, routing) for ids, d in zip(prompt_ids, domains)]
        on_token = self._stop_watcher(len(requests), stops) if stops else None
        results = self._core.generate(requests, on_token)
        return [
            Completion(
                self._text(r.token_ids, stops),
                list(r.token_ids),
                r.finish_reason,
                ids,
                r.routing.domain,
                list(r.routing.layer_domains),
                [list(p) for p in r.routing.router_probs] or None,
                r.error,
            )
            for r, ids in zip(results, prompt_ids)
        ]

    def stream(
        self, prompt, sampling: SamplingParams | None = None, *, chat: bool = False, domain=ROUTE, routing=None, **kw
    ) -> Iterator[str]:
        """Yields the completion of one prompt as text pieces, as tokens are decoded.

        Same arguments as generate(), for a single prompt. The pieces join to the
        Completion.text that generate() would return. Closing the iterator early cancels
        the request and frees its slot.
        """
        if self.tokenizer is None:
            raise ValueError(f"stream() needs a tokenizer, and {self.model_path} has none")
        params = SamplingParams.of(sampling, **kw)
        stops = self._stop_strings(params.stop)
        ids = self._encode(prompt, chat)
        request = self._request(ids, params, self._stop_sequences(stops), self._domains(domain, 1)[0], routing)
        rid = self._core.submit(request)
        tokens: list[int] = []
        sent = ""
        retired = False  # the engine has finished the request and freed its slot
        try:
            while True:
                for event in self._core.step():
                    if event.request_id != rid:
                        continue
                    if event.token >= 0:
                        tokens.append(event.token)
                    if event.finished and event.error:
                        retired = True
                        raise RuntimeError(event.error)
                    retired = retired or event.finished
                text = self._text(tokens, stops)
                done = retired or (stops and self._find_stop(self._decode(tokens), stops) is not None)
                # Hold back an incomplete multi-byte character until its last token comes.
                if not done and text.endswith("\ufffd"):
                    continue
                if len(text) > len(sent):
                    yield text[len(sent) :]
                    sent = text
                if done:
                    return
        finally:
            if not retired:  # a stop string, or the caller closed the iterator
                self._cancel(rid)

    # -- step-wise interface ------------------------------------------------------------
    # What generate() and stream() run on, for callers that own the loop (moa serve): submit
    # requests at any time, step the engine, read each step's events, cancel. Not thread-safe
    # as a whole: one thread should own the loop (the C++ engine serialises its calls).
    def encode(self, prompt, chat: bool = False) -> list[int]:
        """The prompt's token ids as generate() sees them: a string (tokenized with the special
        tokens), with chat=True a user message or a list of {"role", "content"} messages (the
        chat template applied, with the generation prompt), or token ids."""
        return self._encode(prompt, chat)

    def submit(
        self, prompt_ids: list[int], sampling: SamplingParams | None = None, *, domain=ROUTE, routing=None
    ) -> int:
        """Queues one request (token ids, from encode()) in the running batch and returns its id;
        it is admitted at the next step(). The stop strings become stop sequences here; the
        caller checks the decoded text for them (completion_text) and cancels on a hit, as
        stream() does. Errors (ValueError) name the field at fault."""
        params = SamplingParams.of(sampling)
        stops = self._stop_strings(params.stop)
        request = self._request(
            list(prompt_ids), params, self._stop_sequences(stops), self._domains(domain, 1)[0], routing
        )
        return self._core.submit(request)

    def step(self) -> list:
        """Admits waiting requests, prefills them and decodes one token for every running one.
        -> events (request_id, token (-1: none), finished, finish_reason, routing: a RoutingInfo
        on a request's first event, else None). Releases the GIL while it computes."""
        return self._core.step()

    def cancel(self, request_id: int) -> None:
        """Finishes the request at the next step (finish_reason "cancelled"); unknown ids are a no-op."""
        self._core.cancel(request_id)

    def idle(self) -> bool:
        """Nothing waiting or running."""
        return self._core.idle()

    def completion_text(self, token_ids, stop=()) -> str | None:
        """The text of generated ids as a Completion holds it: decoded without special tokens
        and cut before the first stop string (None without a tokenizer)."""
        return self._text(list(token_ids), list(_stop_tuple(stop)))

    # -- helpers --------------------------------------------------------------------
    def _cancel(self, rid: int) -> None:
        self._core.cancel(rid)
        while True:  # the next step retires it and frees the slot
            if any(e.request_id == rid and e.finished for e in self._core.step()):
                return

    @staticmethod
    def _prompt_list(prompts) -> list:
        if isinstance(prompts, (str, bytes)):
            return [prompts]
        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist()
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts is empty: pass a list of strings or of token-id lists")
        if all(isinstance(p, int) for p in prompts):
            raise ValueError("prompts is a flat list of ints: pass a list of token-id lists, e.g. [[1, 2, 3]]")
        return prompts

    def _encode(self, prompt, chat: bool) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"text prompts need a tokenizer, and {self.model_path} has none; pass token ids")
            if not prompt:
                raise ValueError("prompt is empty: a request needs at least one token")
            if chat:
                return self._chat_ids([{"role": "user", "content": prompt}])
            return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        if chat and isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
            return self._chat_ids(list(prompt))
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) for t in prompt):
            raise ValueError(f"each prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not prompt:
            raise ValueError("prompt is empty: a request needs at least one token")
        if chat:
            raise ValueError("chat=True needs text prompts or message lists, not token ids")
        return list(prompt)

    def _chat_ids(self, messages: list[dict]) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"chat=True needs a chat template, and {self.model_path} has none")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def _request(
        self, ids: list[int], params: SamplingParams, stop_ids: list[list[int]], domain: str, routing
    ) -> _C.GenerationRequest:
        """One C++ request: the prompt's ids, its sampling parameters and stop sequences (the
        stop strings' token ids), its domain and strategy."""
        r = _C.GenerationRequest()
        r.domain = domain
        r.routing = routing or ""
        r.prompt = ids
        r.max_new_tokens = int(params.max_new_tokens)
        r.sampling.temperature = float(params.temperature)
        r.sampling.top_k = int(params.top_k)
        r.sampling.top_p = float(params.top_p)
        if params.seed is not None:
            r.sampling.seed = int(params.seed)
        r.stop_sequences = stop_ids
        r.ignore_eos = bool(params.ignore_eos)
        return r

    def _stop_strings(self, stop: tuple[str, ...]) -> list[str]:
        if stop and self.tokenizer is None:
            raise ValueError(f"stop strings need a tokenizer, and {self.model_path} has none")
        return list(stop)

    def _stop_sequences(self, stops: list[str]) -> list[list[int]]:
        # The C++ loop stops on these token sequences at once; the text check in
        # _stop_watcher catches a stop string tokenized differently in context.
        return [list(self.tokenizer(s, add_special_tokens=False)["input_ids"]) for s in stops]

    def _stop_watcher(self, n: int, stops: list[str]):
        generated: list[list[int]] = [[] for _ in range(n)]

        def on_token(index: int, token: int) -> bool:
            generated[index].append(token)
            return self._find_stop(self._decode(generated[index]), stops) is None

        return on_token

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @staticmethod
    def _find_stop(text: str, stops: list[str]) -> int | None:
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        return min(hits) if hits else None

    def _text(self, ids, stops: list[str]) -> str | None:
        if self.tokenizer is None:
            return None
        text = self._decode(list(ids))
        cut = self._find_stop(text, stops)
        return text if cut is None else text[:cut]

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Engine({str(self.model_path)!r}, {c['model_type']}, {c['num_layers']} layers, "
            f"dtype={self._core.dtype}, max_batch={self.max_batch}, max_seq_len={self.max_seq_len})"
        )
