"""The trainable Mixture-of-LoRAs model: a frozen HF causal LM with `MoALinear` in its target
modules and a `Router` at each decoder layer's input.

Shapes: B sequences of T tokens, H hidden size, E experts, D router domains.

Routing during training is by label (teacher forcing): `MoAModel.forward(..., expert_ids=[B])`
gives every token of sequence b the expert `expert_ids[b]` (-1: the base model alone) in every
target linear, through the grouped op `torch.ops.moa.grouped_lora` and its autograd. The routers
see what they will see when served (moa_engine/moa_format.py, router.safetensors): the mean, over
the sequence's routing tokens (the prompt), of layer l's input after its input RMSNorm.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from moa_engine.moa_format import MODULE_PARENT, TARGET_MODULES, LoraExpert, lora_adapter_config, save_peft_adapter
from moa_engine.ops import grouped_lora

from .linear_ce import linear_cross_entropy


class _Batch:
    """What the injected modules read during one forward: each token's expert, and the mask of
    the tokens the routers pool over. Set by MoAModel.forward, cleared after it."""

    def __init__(self):
        self.token_experts: torch.Tensor | None = None  # [B * T] int64
        self.route_mask: torch.Tensor | None = None  # [B, T] float32 (1: pooled)
        self.pooled: dict[int, torch.Tensor] = {}  # layer -> [B, H] float32


class MoALinear(nn.Module):
    """A frozen nn.Linear plus one LoRA expert per domain, applied per token by expert id.

    y = base(x) + scale[e] * (x @ A[e]^T) @ B[e]^T,  e = the token's expert (-1: no update).

    Each expert's A [r, in] and B [out, r] is its own float32 Parameter (so an expert can be
    frozen, optimised or saved alone); experts of lower rank are zero-padded to the largest rank
    when stacked for the op.
    """

    def __init__(self, base: nn.Linear, batch: _Batch):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        self.scales: list[float] = []
        self._batch = batch

    def add_expert(
        self,
        rank: int,
        scale: float,
        generator: torch.Generator | None = None,
        weights: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Append an expert: PEFT's initialisation (A Kaiming-uniform, B zero) or given weights."""
        if weights is None:
            A = torch.empty(rank, self.in_features)
            # PEFT: nn.init.kaiming_uniform_(A, a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)).
            bound = 1.0 / math.sqrt(self.in_features)
            A.uniform_(-bound, bound, generator=generator)
            B = torch.zeros(self.out_features, rank)
        else:
            A, B = (w.detach().to(torch.float32).clone() for w in weights)
            if A.shape[1] != self.in_features or B.shape[0] != self.out_features or A.shape[0] != B.shape[1]:
                raise ValueError(
                    f"expert weights A {list(A.shape)} / B {list(B.shape)} do not fit a "
                    f"{self.in_features} -> {self.out_features} linear"
                )
        device = self.base.weight.device
        self.lora_A.append(nn.Parameter(A.to(device)))
        self.lora_B.append(nn.Parameter(B.to(device)))
        self.scales.append(float(scale))

    @property
    def num_experts(self) -> int:
        return len(self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = self._batch.token_experts
        if ids is None or self.num_experts == 0:
            return self.base(x)
        weight, bias = self.base.weight, self.base.bias
        device = x.device.type
        # the compute dtype: autocast's (as the base linear would run under it), else x's
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        rank = max(a.shape[0] for a in self.lora_A)
        A = torch.stack([a if a.shape[0] == rank else F.pad(a, (0, 0, 0, rank - a.shape[0])) for a in self.lora_A]).to(
            dtype
        )
        B = torch.stack([b if b.shape[1] == rank else F.pad(b, (0, rank - b.shape[1])) for b in self.lora_B]).to(dtype)
        scales = torch.tensor(self.scales, dtype=torch.float32, device=x.device)
        x2 = x.reshape(-1, self.in_features).to(dtype)
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            # a trainable base (not what MoAModel builds): the unfused path, autograd for all
            y = self.base(x)
            return y + grouped_lora(x2, A, B, ids, scales).view(y.shape)
        with torch.autocast(device, enabled=False):
            y = _FrozenLinearWithExperts.apply(
                x2, weight.to(dtype), None if bias is None else bias.to(dtype), A, B, ids, scales
            )
        return y.view(*x.shape[:-1], self.out_features)


class _FrozenLinearWithExperts(torch.autograd.Function):
    """y = x W^T + b + (each token's expert update), W and b frozen, as one autograd node:
    the update is added in place into the base's output, and in backward the transposed update
    into the base's input gradient, so neither allocates, zero-fills and adds a separate
    [T, features] tensor. On the CPU the forward keeps the rank-r intermediate v = x A^T and
    the backward reuses it and forms u = grad B once (moa._grouped_lora_add_v_ /
    _grouped_lora_backward_); elsewhere grouped_lora_add_ and _grouped_lora_weight_grads."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, ids, scales):
        y = F.linear(x, weight, bias)
        v = None
        if x.device.type == "cpu" and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4]):
            v = x.new_empty(x.shape[0], A.shape[1])
            torch.ops.moa._grouped_lora_add_v_(y, v, x, A, B, ids, scales)
        else:
            torch.ops.moa.grouped_lora_add_(y, x, A, B, ids, scales)
        ctx.save_for_backward(x, weight, A, B, ids, scales, v)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, A, B, ids, scales, v = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_a = grad_b = None
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        if need_x:
            grad_x = grad.mm(weight)
        if need_x and need_w and v is not None:
            grad_a, grad_b = torch.ops.moa._grouped_lora_backward_(grad_x, grad, x, v, A, B, ids, scales)
        else:
            if need_x:
                torch.ops.moa.grouped_lora_add_(grad_x, grad, B.transpose(1, 2), A.transpose(1, 2), ids, scales)
            if need_w:
                grad_a, grad_b = torch.ops.moa._grouped_lora_weight_grads(grad, x, A, B, ids, scales)
        return grad_x, None, None, grad_a, grad_b, None, None


def decoder_layers(model) -> nn.ModuleList:
    """The decoder layers of a Llama-family HF causal LM (model.model.layers)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(
            f"{type(model).__name__}: expected a Llama-family causal LM with model.model.layers (llama, mistral, qwen2)"
        )
    return layers


class MoAModel(nn.Module):
    """A frozen HF causal LM with LoRA experts in `target_modules` and per-layer routers.

    model: the HF model (its parameters are frozen here). Experts are added with add_expert /
    load_expert; routers with set_routers. forward(input_ids, attention_mask, expert_ids,
    route_mask) returns the final hidden states [B, T, H]; lm_logits(h) applies the LM head.
    """

    def __init__(self, model, target_modules=TARGET_MODULES):
        super().__init__()
        unknown = [m for m in target_modules if m not in MODULE_PARENT]
        if unknown or not target_modules:
            raise ValueError(f"target_modules: {unknown or 'empty'}; choose from {list(TARGET_MODULES)}")
        self.hf = model
        for p in model.parameters():
            p.requires_grad_(False)
        self.target_modules = [m for m in TARGET_MODULES if m in target_modules]
        self.experts: list[str] = []
        self.expert_meta: dict[str, dict] = {}  # name -> {"rank", "alpha", "use_rslora"}
        self._batch = _Batch()
        self.linears: dict[tuple[int, str], MoALinear] = {}
        layers = decoder_layers(model)
        self.num_layers = len(layers)
        self.hidden_size = model.config.hidden_size
        for l, layer in enumerate(layers):
            for module in self.target_modules:
                parent = getattr(layer, MODULE_PARENT[module])
                base = getattr(parent, module)
                if not isinstance(base, nn.Linear):
                    raise ValueError(
                        f"layer {l}: {MODULE_PARENT[module]}.{module} is {type(base).__name__}, not nn.Linear"
                    )
                wrapped = MoALinear(base, self._batch)
                setattr(parent, module, wrapped)
                self.linears[(l, module)] = wrapped
            layer.input_layernorm.register_forward_hook(self._pool_hook(l))
        self.routers = nn.ParameterList()  # per layer [D, H] float32; empty: no routers
        self.router_domains: list[str] = []

    # -- experts ---------------------------------------------------------------------
    def add_expert(self, name: str, rank: int = 16, alpha: float = 32, seed: int = 0, use_rslora: bool = False) -> None:
        """A new expert with PEFT's initialisation, drawn from `seed` (B = 0: it starts as the base)."""
        self._check_new(name)
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        g = torch.Generator().manual_seed(seed)
        for key in sorted(self.linears):
            self.linears[key].add_expert(rank, scale, generator=g)
        self.experts.append(name)
        self.expert_meta[name] = {"rank": rank, "alpha": alpha, "use_rslora": use_rslora}

    def load_expert(self, expert: LoraExpert) -> None:
        """Add a loaded PEFT expert (moa_format.LoraExpert) with its own ranks and scales.
        Targets it does not adapt get a rank-1 zero expert (no update)."""
        self._check_new(expert.name)
        for key, linear in self.linears.items():
            if key in expert.targets:
                A, B, scale = expert.targets[key]
                linear.add_expert(A.shape[0], scale, weights=(A, B))
            else:
                linear.add_expert(
                    1, 0.0, weights=(torch.zeros(1, linear.in_features), torch.zeros(linear.out_features, 1))
                )
        extra = sorted(k for k in expert.targets if k not in self.linears)
        if extra:
            raise ValueError(
                f"expert {expert.name!r} adapts {extra[:3]}..., outside this model's target modules {self.target_modules}"
            )
        self.experts.append(expert.name)
        self.expert_meta[expert.name] = {"path": str(expert.path) if expert.path else None}

    def _check_new(self, name: str) -> None:
        if name in self.experts:
            raise ValueError(f"expert {name!r} already exists")

    def expert_index(self, name: str) -> int:
        try:
            return self.experts.index(name)
        except ValueError:
            raise ValueError(f"unknown expert {name!r}; experts: {self.experts}") from None

    def expert_parameters(self, name: str) -> list[nn.Parameter]:
        """The A and B parameters of one expert, in a fixed order."""
        e = self.expert_index(name)
        params = []
        for key in sorted(self.linears):
            params += [self.linears[key].lora_A[e], self.linears[key].lora_B[e]]
        return params

    def expert_weights(self, name: str) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
        """One expert's weights: {(layer, module): (A [r, in], B [out, r])}, detached."""
        e = self.expert_index(name)
        return {
            key: (linear.lora_A[e].detach(), linear.lora_B[e].detach()) for key, linear in sorted(self.linears.items())
        }

    def save_expert(self, name: str, folder, base_model: str, adapter_config: dict | None = None) -> Path:
        """Write one expert as a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors),
        atomically. adapter_config: keep this config (an expert loaded from a folder); otherwise
        one is written from the expert's rank and alpha."""
        meta = self.expert_meta[self.experts[self.expert_index(name)]]
        if adapter_config is None:
            if "rank" not in meta:
                raise ValueError(f"expert {name!r} was loaded from a folder: pass its adapter_config")
            adapter_config = lora_adapter_config(
                base_model, meta["rank"], meta["alpha"], self.target_modules, meta["use_rslora"]
            )
        return save_peft_adapter(folder, adapter_config, self.expert_weights(name))

    # -- routers ---------------------------------------------------------------------
    def set_routers(self, domains: list[str], weights: list[torch.Tensor] | None = None) -> None:
        """Per-layer routers over `domains` (router output i scores domains[i]): given [D, H]
        weights, or zeros (uniform probabilities)."""
        D, H = len(domains), self.hidden_size
        if weights is None:
            weights = [torch.zeros(D, H) for _ in range(self.num_layers)]
        if len(weights) != self.num_layers or any(tuple(w.shape) != (D, H) for w in weights):
            raise ValueError(f"routers: expected {self.num_layers} tensors of [{D}, {H}]")
        device = self.hf.get_input_embeddings().weight.device
        self.routers = nn.ParameterList(nn.Parameter(w.detach().to(device, torch.float32).clone()) for w in weights)
        self.router_domains = list(domains)

    def widen_routers(self, domain: str) -> None:
        """Add one router output (a zero row) for a new domain; the other rows are kept."""
        if not len(self.routers):
            raise ValueError("the model has no routers to widen")
        weights = [torch.cat([w.detach(), torch.zeros(1, w.shape[1], device=w.device)]) for w in self.routers]
        self.set_routers(self.router_domains + [domain], weights)

    def _pool_hook(self, layer: int):
        def hook(module, inputs, output):
            mask = self._batch.route_mask
            if mask is None or not len(self.routers):
                return
            m = mask.to(torch.float32).unsqueeze(-1)  # [B, T, 1]
            pooled = (output.to(torch.float32) * m).sum(1) / m.sum(1).clamp_min(1.0)
            self._batch.pooled[layer] = pooled

        return hook

    # -- forward ---------------------------------------------------------------------
    def forward(self, input_ids, attention_mask, expert_ids=None, route_mask=None):
        """(final hidden states [B, T, H], router logits: one [B, D] float32 per layer, or None).

        expert_ids: [B] each sequence's expert index (-1: none), or None (the base model).
        route_mask: [B, T] the tokens the routers pool over (the prompt), or None (no routing).
        The batch state stays set after the call: gradient checkpointing re-runs the layers
        during backward and must see the same experts.
        """
        b = self._batch
        B, T = input_ids.shape
        b.token_experts = None
        if expert_ids is not None:
            ids = torch.as_tensor(expert_ids, dtype=torch.int64, device=input_ids.device)
            if ids.shape != (B,):
                raise ValueError(f"expert_ids: expected [{B}], got {list(ids.shape)}")
            if len(ids) and (int(ids.min()) < -1 or int(ids.max()) >= len(self.experts)):
                raise ValueError(f"expert_ids: values must be in [-1, {len(self.experts)}), got {ids.tolist()}")
            b.token_experts = ids.repeat_interleave(T)
        b.route_mask = route_mask if len(self.routers) else None
        b.pooled = {}
        out = self.hf.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        logits = None
        if b.route_mask is not None:
            logits = [b.pooled[l] @ self.routers[l].t() for l in range(self.num_layers)]
        return out.last_hidden_state, logits

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.hf.lm_head(hidden)

    def token_losses(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token CE [N] (float32) of the LM head on hidden [N, H] against labels [N]: the
        frozen head through linear_ce (no [N, vocab] logits), a trainable one the plain way."""
        head = self.hf.lm_head
        if (
            isinstance(head, nn.Linear)
            and not head.weight.requires_grad
            and (head.bias is None or not head.bias.requires_grad)
        ):
            return linear_cross_entropy(hidden, head.weight, labels, head.bias)
        return F.cross_entropy(self.lm_logits(hidden).float(), labels, reduction="none")


def enable_checkpointing(model) -> None:
    """Activation (gradient) checkpointing of the decoder layers, non-reentrant (the base is
    frozen, so the layers' inputs need no grad for the LoRA weights to get theirs)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
