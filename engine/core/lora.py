"""LoRA adapters inside the model's linear layers, mixed per token in one batch (the adapter files: engine.adapters).

Every nn.Linear some adapter targets keeps, beside its weight, all adapters' A stacked as one [R, in] tensor and
their B, each times its scale for that module, as one [out, R] tensor: adapter a owns the columns
offsets[a]:offsets[a] + R_a of that layout in every module (R_a: its largest rank; a module where it has a smaller
rank, or none, holds zeros there). A forward hook on the linear adds

    y += ((x @ A^T) * select) @ B^T

where `select` [tokens, R] is 1 on the columns of the adapter of each token's request and 0 elsewhere, so a
base-model token gets exactly zero added. One GEMM for every adapter's A, one for every B, whichever adapters the
batch mixes. Linears that read one input (q/k/v of an attention, gate/up of an MLP: SHARED_INPUT) keep their A's
stacked as one tensor, and the first of them to run computes x A^T for all of them in one GEMM, which the others
reuse; on CUDA the masking rides in the expand (one Triton kernel: engine.core.kernels.lora). A Gemma layer runs 11
LoRA kernels instead of 21, and a decode step's LoRA cost is these small kernels' count.

`select` is one tensor per forward, shared by every hooked linear: built per prompt token for a prefill, and for
decode the rows of a static [num_kv_rows, R] buffer (`kv_select`), written when a sequence is admitted, so a captured
decode graph reads each KV row's adapter as it is at replay. A forward whose batch holds no adapter token
runs no LoRA at all (the runner's graph key says which), so base-only batches are the model without adapters.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.adapters import AdapterError, LoraAdapter, adapter_names, read_adapter, weight_module
from engine.config import UserError
from engine.core.transfer import to_device


class AdapterRefused(UserError, ValueError):
    """An adapter the engine core cannot put in this model (its directory, targets, shapes or weights); the message
    names its directory and what to do."""


class LoraTable:
    """The loaded adapters (index 0: the base model, adapter i: name i - 1 of `names`) and the per-token column
    selection the hooked linears read; with no adapters it hooks nothing and every method does nothing."""

    def __init__(self, model, adapters: dict[str, str], device, num_kv_rows: int):
        self.names = adapter_names(adapters)
        self.device = torch.device(device)
        dtype = next(model.parameters()).dtype
        try:
            loaded = [_load(read_adapter(name, adapters[name]), model) for name in self.names]
        except AdapterError as exc:
            raise AdapterRefused(str(exc)) from None
        widths = [max((a.shape[0] for a, _, _ in weights.values()), default=0) for weights in loaded]
        self.offsets = np.cumsum([0] + widths).tolist()  # adapter i + 1 owns columns offsets[i]:offsets[i + 1]
        self.num_columns = self.offsets[-1]
        # row a: 1 on adapter a's columns (row 0, the base model: none)
        self.selectors = torch.zeros(len(self.names) + 1, self.num_columns, dtype=dtype, device=device)
        for i in range(len(self.names)):
            self.selectors[i + 1, self.offsets[i]:self.offsets[i + 1]] = 1
        self.kv_select = torch.zeros(num_kv_rows, self.num_columns, dtype=dtype, device=device)
        self.active: torch.Tensor | None = None  # this forward's [tokens, R] selection; None: no LoRA
        # per hooked linear (its index in `where`): (its group of shared-input linears or None, its place in it)
        self.places: list[tuple[int | None, int]] = []
        self.group_a: list[torch.Tensor] = []  # per group: its linears' A stacked, [members * R, in]
        # the x A^T last computed for a group in this forward: ((group, x's address, shape, strides), x A^T, x)
        self._shared: tuple | None = None
        self.shared_hits = 0  # how many linears reused a group's x A^T (the tests read it)
        modules = dict(model.named_modules())
        targeted = sorted({key for weights in loaded for key in weights})
        for members in _shared_input_groups(targeted, modules):
            group = len(self.group_a) if len(members) > 1 else None
            stacked = [self._stacked(modules[key], [weights.get(key) for weights in loaded], dtype)
                       for key in members]
            if group is not None:
                self.group_a.append(torch.cat([a for a, _ in stacked]))
                # each member's A a view of the group's, so the stacked tensor is the only copy
                stacked = [(self.group_a[group][i * self.num_columns:(i + 1) * self.num_columns], b)
                           for i, (_, b) in enumerate(stacked)]
            for place, (key, (a, b)) in enumerate(zip(members, stacked)):
                self._attach(modules[key], a, b, group, place)
        if self.names:
            LORA_TABLES[id(self)] = self

    @property
    def is_loaded(self) -> bool:
        return bool(self.names)

    def _stacked(self, module: torch.nn.Linear, parts: list, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapters' A [R, in] and scaled B [out, R] of one linear, in the shared column layout."""
        device = module.weight.device
        a = torch.zeros(self.num_columns, module.in_features, dtype=dtype, device=device)
        b = torch.zeros(module.out_features, self.num_columns, dtype=dtype, device=device)
        for i, part in enumerate(parts):
            if part is not None:
                lora_a, lora_b, scale = part
                start = self.offsets[i]
                a[start:start + lora_a.shape[0]] = lora_a.to(device=device, dtype=dtype)
                b[:, start:start + lora_a.shape[0]] = (lora_b.float() * scale).to(device=device, dtype=dtype)
        return a, b

    def _attach(self, module: torch.nn.Linear, a: torch.Tensor, b: torch.Tensor, group: int | None,
                place: int) -> None:
        module.register_buffer("engine_lora_a", a, persistent=False)
        module.register_buffer("engine_lora_b", b, persistent=False)
        module.register_buffer("engine_lora", torch.tensor([id(self), len(self.places)]), persistent=False)
        module.register_forward_hook(_lora_hook)
        self.places.append((group, place))

    def index(self, name: str | None) -> int:
        """The index a request's adapter name travels as (0: the base model)."""
        return 0 if name is None else self.names.index(name) + 1

    def check(self, index: int) -> str | None:
        """Why a request's adapter index cannot run here (None: it can)."""
        if 0 <= index <= len(self.names):
            return None
        loaded = ", ".join(self.names) or "none"
        return f"adapter index {index} is not loaded in this engine core (loaded: {loaded})"

    def assign(self, seqs, kv_rows: torch.Tensor) -> None:
        """Set each admitted sequence's adapter in its KV row, for the decode steps (no host sync)."""
        if self.names:
            adapters = to_device([s.adapter for s in seqs], torch.int64, self.device)
            self.kv_select.index_copy_(0, kv_rows, self.selectors[adapters])

    def uses(self, seqs) -> bool:
        """Whether a batch of these sequences runs any LoRA."""
        return bool(self.names) and any(s.adapter for s in seqs)

    def prefill_select(self, seqs, starts) -> torch.Tensor | None:
        """The [tokens, R] selection of a packed prefill (prompt j's tokens from starts[j] to starts[j + 1]), or None
        when no prompt has an adapter."""
        if not self.uses(seqs):
            return None
        adapters = np.repeat(np.array([s.adapter for s in seqs], dtype=np.int64), np.diff(np.asarray(starts)))
        return self.selectors[to_device(torch.from_numpy(adapters), torch.int64, self.device)]

    def decode_select(self, num_rows: int, is_lora: bool) -> torch.Tensor | None:
        """The decode step's selection: the first `num_rows` KV rows' (decode row b is KV row b), when it runs LoRA."""
        return self.kv_select[:num_rows] if is_lora else None

    def set_active(self, select: torch.Tensor | None) -> None:
        """The selection of the next forward; None turns LoRA off."""
        self.active = select
        self._shared = None  # a shared x A^T serves its own forward only

    def lora_add(self, out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, index: int) -> None:
        """out += ((x A^T) * select) B^T, in place, for the current forward (nothing when it runs no LoRA); linear
        `index` of a shared-input group reuses the group's x A^T when another member computed it from this x."""
        select = self.active
        if select is None:
            return
        flat = out.view(-1, out.shape[-1])
        x = x.reshape(-1, x.shape[-1])
        group, place = self.places[index]
        if group is None:
            t = torch.mm(x, a.t())
        else:
            width = self.num_columns
            key = (group, x.data_ptr(), tuple(x.shape), tuple(x.stride()))
            if self._shared is not None and self._shared[0] == key:
                self.shared_hits += 1
            else:
                # x is kept with it: while the entry lives its memory cannot be freed and handed to another input
                # of the same shape (a sibling that reads another tensor must not match by address)
                self._shared = (key, torch.mm(x, self.group_a[group].t()), x)
            t = self._shared[1][:, place * width:(place + 1) * width]
        if flat.is_cuda:  # the masking inside the expand: one kernel (engine.core.kernels.lora)
            from engine.core.kernels.lora import masked_expand_cuda

            masked_expand_cuda(flat, t, select, b)
        else:
            flat.addmm_(t * select, b.t())


# Sibling linears that one module calls on the same input, by their names in the transformers models (a group is
# only an offer: a member reuses the group's x A^T when its own input is the very tensor the group's was computed
# from in this forward, and computes its own otherwise).
SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"), ("w1", "w3"))


def _shared_input_groups(keys: list[str], modules: dict) -> list[list[str]]:
    """The targeted linears `keys` in groups: siblings named in one SHARED_INPUT entry with the same in_features
    together, in that entry's order; every other linear alone."""
    groups: dict[tuple, list[str]] = {}
    for key in keys:
        parent, _, name = key.rpartition(".")
        entry = next((i for i, names in enumerate(SHARED_INPUT) if name in names), None)
        home = (parent, entry, modules[key].in_features) if entry is not None else (key,)
        groups.setdefault(home, []).append(key)
    for home, members in groups.items():
        if len(home) == 3:
            members.sort(key=lambda key: SHARED_INPUT[home[1]].index(key.rpartition(".")[2]))
    return list(groups.values())


def _load(adapter: LoraAdapter, model) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module name: (A [r, in], B [out, r], scale)} of one adapter, checked against the model: every module its
    config targets is an nn.Linear with both weights of the rank its config gives and the module's shapes, and the
    file holds nothing else."""
    label = adapter.label
    tensors = _read_weights(adapter.weights, label)
    modules = dict(model.named_modules())
    output = model.get_output_embeddings()
    targeted = [key for key, module in modules.items()
                if key and adapter.targets(key, isinstance(module, torch.nn.Linear) and module is not output)]
    if not targeted:
        raise AdapterError(f"{label}: its target_modules {_shown(adapter.target_modules)} match no module of this "
                           f"model; use an adapter trained on this model's architecture")
    for key in targeted:
        _check_module(key, modules[key], output, label)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        found = weight_module(key)
        if found is None:
            raise AdapterError(f"{label}: its weights hold {key!r}, which is not a LoRA A or B weight (a DoRA "
                               f"magnitude, a bias or a module saved whole?); use a plain LoRA adapter")
        parts.setdefault(found[0], {})[found[1]] = tensor
    stray = sorted(set(parts) - set(targeted))
    if stray:
        raise AdapterError(f"{label}: its weights are for {stray[0]!r}, which its target_modules do not target in "
                           f"this model (or the model has no such module); use an adapter trained on this model")
    return {key: _module_weights(adapter, key, modules[key], parts.get(key, {}), label) for key in targeted}


def _check_module(key: str, module, output, label: str) -> None:
    """AdapterError unless `module` is a linear layer that every token of a forward passes (the per-token selection
    has a row per token): not an embedding or another kind of layer, not the output layer (run at the sampled
    positions only), not a mixture-of-experts expert (run on the tokens routed to it)."""
    if not isinstance(module, torch.nn.Linear):
        raise AdapterError(f"{label}: it targets {key!r}, a {type(module).__name__}; the engine runs LoRA on "
                           f"nn.Linear layers only (no embeddings, convolutions or fused experts): use an adapter "
                           f"without it")
    if module is output:
        raise AdapterError(f"{label}: it targets the output layer {key!r}, which the engine runs at the sampled "
                           f"positions only; use an adapter without it (PEFT's all-linear leaves it out)")
    if ".experts." in f".{key}.":
        raise AdapterError(f"{label}: it targets {key!r}, an expert of a mixture-of-experts layer, which runs on the "
                           f"tokens routed to it only; use an adapter on the attention and dense layers")


def _module_weights(adapter: LoraAdapter, key: str, module, part: dict, label: str) -> tuple:
    missing = [f"lora_{p}" for p in ("A", "B") if p not in part]
    if missing:
        raise AdapterError(f"{label}: its weights have no {' or '.join(missing)} for {key!r}, which its config "
                           f"targets; the file does not belong to this config (save the adapter again)")
    r, scale = adapter.rank_and_scale(key)
    a, b = part["A"], part["B"]
    expected = {"A": (r, module.in_features), "B": (module.out_features, r)}
    for name, tensor in (("A", a), ("B", b)):
        if tuple(tensor.shape) != expected[name]:
            raise AdapterError(f"{label}: lora_{name} of {key!r} is {list(tensor.shape)}, but rank {r} on this "
                               f"model's {module.in_features} -> {module.out_features} layer needs "
                               f"{list(expected[name])}; use an adapter trained on this model (with its "
                               f"adapter_config.json)")
    return a, b, scale


def _read_weights(path: str, label: str) -> dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            tensors = load_file(path, device="cpu")
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is this adapter's start-up error, named
        raise AdapterError(f"{label}: cannot read {path} ({type(exc).__name__}: {exc}); save the adapter again") \
            from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise AdapterError(f"{label}: {path} holds no mapping of names to tensors; save the adapter again")
    return tensors


def _shown(names) -> str:
    return repr(names) if isinstance(names, str) else "[" + ", ".join(names) + "]"


def _lora_hook(module, args, output) -> None:
    """The forward hook of every LoRA'd linear (one function, so a compiled layer's graph does not depend on which
    linear it is): its adapters' contribution added to `output` in place, through the lora_add op."""
    lora_add(output, args[0], module.engine_lora_a, module.engine_lora_b, module.engine_lora)


# The LoRA tables whose linears' hooks call lora_add: id -> table (more than one in a process where tests build
# several engines).
LORA_TABLES: dict[int, LoraTable] = {}


@torch.library.custom_op("engine::lora_add", mutates_args=("out",))
def lora_add(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, where: torch.Tensor) -> None:
    """Add the current forward's LoRA contribution to a linear's output `out` in place; `where` is the module's CPU
    buffer [table id, its index in the table]. Opaque to torch.compile, so the one compiled graph of every decoder
    layer calls it with that linear's tensors, and it reads the forward's selection when it runs (in a captured
    decode graph: the static KV-row buffer)."""
    table = LORA_TABLES.get(int(where[0]))
    if table is not None:
        table.lora_add(out, x, a, b, int(where[1]))


@lora_add.register_fake
def _(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, where: torch.Tensor) -> None:
    return None
