"""A vLLM plugin: grouped multi-LoRA ops for vLLM's CPU platform (entry point `vllm.general_plugins`).

vLLM runs LoRA on CPUs through pure-PyTorch ops (`vllm/lora/ops/torch_ops/lora_ops.py`, used by
`PunicaWrapperCPU`). Three problems with them in vLLM 0.32, fixed here: the first two by replacing the three
`bgmv_*` ops (the `sgmv_*` prefill ops delegate to them), the third by replacing `add_lora_logits`:

- **Speed.** Each op gathers one full, rank-padded weight matrix *per token* (`weights[indices]`, a
  [tokens, out, in] copy) before an einsum, in every LoRA layer of every step. The cost grows with
  `max_lora_rank` and the batch, even for requests without an adapter (bench/serve_throughput.py
  --stock-lora compares). These ops instead run one matmul per adapter present in the batch, on that adapter's rows.
- **Correctness** (vllm-project/vllm#48421, open upstream): tokens without an adapter carry index -1, which the
  GPU kernels skip; the CPU ops index `weights[-1]`, so a base request batched next to adapter requests gets
  the last slot's adapter once every slot is filled. These ops give such rows no LoRA delta, as the GPU
  kernels do.
- **Prompt log-probs** (`echo` + `logprobs`, `prompt_logprobs`: how evaluation harnesses score multiple choice):
  vLLM computes them with one `compute_logits` per request over that request's prompt rows, but the LoRA logits
  path (`PunicaWrapperCPU.add_lora_logits`) maps rows to adapters with `sampler_indices`, one entry per request
  in the batch. With several such requests in a batch the row counts differ and vLLM's op raises (an einsum
  broadcast error), which kills the engine. `add_lora_logits` here takes each prompt row's adapter from the
  batch's per-token indices instead: the prompt rows are a slice of the step's hidden states, whose position
  the model runner's prompt-logprob pass (wrapped to note its hidden states) and the slice's storage offset give.

vLLM loads general plugins in every process it starts (API server, engine core, workers), which is the only
way to reach the worker that runs the model. The plugin changes nothing unless the platform is CPU and the
vLLM version is the one it was tested against; `LORAFORGE_VLLM_CPU_LORA=0` (or vLLM's own `VLLM_PLUGINS`
allow-list) turns it off. This module imports nothing of loraforge: it runs inside vLLM's processes.
"""

from __future__ import annotations

import logging
import os
import weakref

import torch

log = logging.getLogger(__name__)

TESTED_VLLM = ("0.32.",)  # the ops' signatures and call sites were read in this release line
_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")


class _Plans:
    """Rows grouped by adapter slot, computed once per distinct index tensor (vLLM passes the same token indices
    to every LoRA layer of a step) and matched by content, so a reused buffer can never return a stale plan.
    A plan is (rows with an adapter, sorted by slot; [(slot, count)]; whether every row has an adapter)."""

    def __init__(self, size: int = 4) -> None:
        self.size, self.entries = size, []

    def get(self, indices: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int]], bool]:
        for key, plan in self.entries:
            if key.shape == indices.shape and torch.equal(key, indices):
                return plan
        order = torch.argsort(indices, stable=True)
        slots, counts = torch.unique_consecutive(indices[order], return_counts=True)
        groups = [(slot, count) for slot, count in zip(slots.tolist(), counts.tolist()) if slot >= 0]
        rows = order[order.numel() - sum(count for _, count in groups):]  # -1 (no adapter) sorts first
        plan = (rows, groups, rows.numel() == indices.numel())
        self.entries = [(indices.clone(), plan), *self.entries][: self.size]
        return plan


class _LiveSlots:
    """The slots of a stacked weight tensor that hold non-zero weights (an adapter that targets this layer), each
    as the transposed [in, out] view the matmul takes.

    vLLM wraps every supported linear layer, also those no loaded adapter targets, and zero-fills empty slots;
    multiplying by zeros is skipped. Cached per tensor object (vLLM passes the same stacked tensors every step)
    and its version counter, which every in-place write (an adapter loaded into or cleared from a slot) bumps;
    a tensor without one (an inference tensor) is never cached.
    """

    def __init__(self) -> None:
        self.entries: dict[int, tuple[weakref.ref, int, dict[int, torch.Tensor]]] = {}

    @staticmethod
    def scan(weights: torch.Tensor) -> dict[int, torch.Tensor]:
        stacked = weights.squeeze(1) if weights.dim() == 4 else weights
        live = stacked.reshape(stacked.shape[0], -1).abs().amax(dim=1) > 0
        return {slot: stacked[slot].t() for slot in torch.nonzero(live).flatten().tolist()}

    def get(self, weights: torch.Tensor) -> dict[int, torch.Tensor]:
        try:
            version = weights._version
        except RuntimeError:
            return self.scan(weights)
        hit = self.entries.get(id(weights))
        if hit is None or hit[0]() is not weights or hit[1] != version:
            hit = (weakref.ref(weights), version, self.scan(weights))
            self.entries[id(weights)] = hit
        return hit[2]


_plans, _live = _Plans(), _LiveSlots()
_prompt_pass: list[torch.Tensor] = []  # the hidden states of the prompt-logprob pass running now, if any


def lora_delta(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
               dtype: torch.dtype) -> torch.Tensor | None:
    """Row t is inputs[t] @ weights[indices[t]].T; rows whose index is negative, or whose slot holds only zeros,
    are zero. None means every row is zero.

    `weights` is vLLM's stacked layout, [slots, out, in] or [slots, 1, out, in]. Rows are grouped by slot and
    each group is one matmul, instead of vLLM's per-token gather of a whole weight matrix.
    """
    live = _live.get(weights)
    rows, groups, every_row = _plans.get(indices)
    if not any(slot in live for slot, _ in groups):
        return None
    x = inputs if inputs.dtype == dtype else inputs.to(dtype)
    if any(w.dtype != dtype for w in live.values()):
        live = {slot: w.to(dtype) for slot, w in live.items()}
    if every_row and len(groups) == 1:  # the whole batch on one adapter
        return x @ live[groups[0][0]]
    sizes = [count for _, count in groups]
    grouped = x.new_zeros(rows.numel(), weights.shape[-2])
    for (slot, _), rows_in, rows_out in zip(groups, x.index_select(0, rows).split(sizes), grouped.split(sizes)):
        if slot in live:
            torch.mm(rows_in, live[slot], out=rows_out)
    return x.new_zeros(x.shape[0], weights.shape[-2]).index_copy_(0, rows, grouped)


def _rows_match(inputs: torch.Tensor, indices: torch.Tensor) -> bool:
    return inputs.dim() == 2 and indices.dim() == 1 and inputs.shape[0] == indices.shape[0]


def _store(target: torch.Tensor, outputs: torch.Tensor | None, add: bool) -> None:
    """Write (or, with `add`, add) an op's outputs into its slice of vLLM's output tensor; no outputs means a
    zero delta: nothing to add, zeros to write."""
    if outputs is None:
        if not add:
            target.zero_()
    elif add:
        target += outputs
    else:
        target.copy_(outputs)


def make_ops(original: dict):
    """The three replacement ops; shapes they were not written for go to vLLM's originals (`original`)."""

    def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling=1.0):
        if not _rows_match(inputs, lora_indices_tensor):
            return original["bgmv_shrink"](inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling)
        outputs = lora_delta(inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype)
        _store(output_tensor[:, : lora_a_weights.shape[-2]], None if outputs is None else scaling * outputs, False)

    def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs=True):
        if not _rows_match(inputs, lora_indices_tensor):
            return original["bgmv_expand"](inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs)
        outputs = lora_delta(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
        common = min(lora_b_weights.shape[-2], output_tensor.shape[1])  # adapter and model may pad differently
        if outputs is not None:
            limit = 1 if outputs.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]
            outputs = outputs[:limit, :common]
        _store(output_tensor[:, :common], outputs, add_inputs)

    def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset, slice_size,
                          add_inputs=True):
        if not _rows_match(inputs, lora_indices_tensor):
            return original["bgmv_expand_slice"](inputs, lora_b_weights, output_tensor, lora_indices_tensor,
                                                 slice_offset, slice_size, add_inputs)
        outputs = lora_delta(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
        _store(output_tensor[:, slice_offset: slice_offset + slice_size], outputs, add_inputs)

    return {"bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand, "bgmv_expand_slice": bgmv_expand_slice}


def logits_indices(x: torch.Tensor, sampler: torch.Tensor, tokens: torch.Tensor,
                   hidden: torch.Tensor | None) -> torch.Tensor:
    """The adapter slot of each row of `x`, the input of the LoRA logits op.

    Sampling passes one row per sampled token, matching `sampler` (vLLM's sampler_indices). The prompt-logprob
    pass passes one request's prompt rows, `hidden[offset:offset + n]`, a view of the step's hidden states whose
    rows match `tokens` (token_lora_indices): their slots are `tokens[offset:offset + n]`."""
    n = x.shape[0]
    if n == sampler.shape[0]:
        return sampler
    if hidden is not None and hidden.dim() == 2 and x.dim() == 2 and n and hidden.shape[0] <= tokens.shape[0] and (
            x.untyped_storage().data_ptr() == hidden.untyped_storage().data_ptr()) and x.stride() == hidden.stride():
        start, rem = divmod(x.storage_offset() - hidden.storage_offset(), hidden.stride(0))
        if rem == 0 and 0 <= start and start + n <= hidden.shape[0]:
            return tokens[start:start + n]
    raise RuntimeError(f"LoRA logits: {n} rows but {sampler.shape[0]} sampled rows, and the rows are not a slice of "
                       "the prompt-logprob pass's hidden states; cannot tell which adapter each row belongs to")


def make_add_lora_logits(shrink, expand):
    """PunicaWrapperCPU.add_lora_logits over the grouped ops, with rows mapped by `logits_indices`."""

    def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None, **kwargs):
        if not _live.get(lora_a_stacked):  # no loaded adapter trains the LM head (the usual case): no delta
            return y
        flat_y, flat_x = y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1])
        indices = logits_indices(flat_x, self.sampler_indices, self.token_lora_indices,
                                 _prompt_pass[-1] if _prompt_pass else None)
        if buffer is None:  # float32, as vLLM's own op and the triton kernels keep it
            buffer = torch.zeros((flat_x.size(0), lora_b_stacked.size(-1)), dtype=torch.float32, device=x.device)
        shrink(flat_x, lora_a_stacked, buffer, indices, scale)
        expand(buffer, lora_b_stacked, flat_y, indices, add_inputs=True)  # in place, into y
        return y

    return add_lora_logits


def _note_prompt_pass(original):
    """Wrap the model runner's prompt-logprob pass so add_lora_logits can find its rows' positions."""

    def _get_prompt_logprobs_dict(self, hidden_states, *args, **kwargs):
        _prompt_pass.append(hidden_states)
        try:
            return original(self, hidden_states, *args, **kwargs)
        finally:
            _prompt_pass.pop()

    _get_prompt_logprobs_dict._loraforge = True
    return _get_prompt_logprobs_dict


def register() -> bool:
    """vLLM's plugin hook (called once per process). Returns whether the ops were replaced."""
    if os.environ.get("LORAFORGE_VLLM_CPU_LORA", "1") == "0":
        return False
    import vllm
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    if not vllm.__version__.startswith(TESTED_VLLM):
        log.warning("loraforge: vLLM %s is not a release its CPU LoRA ops were checked against %s; leaving "
                    "vLLM's own ops in place", vllm.__version__, TESTED_VLLM)
        return False
    import vllm.lora.ops.torch_ops as package
    import vllm.lora.ops.torch_ops.lora_ops as lora_ops
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    if getattr(lora_ops, "_loraforge_grouped", False):
        return True
    ops = make_ops({name: getattr(lora_ops, name) for name in _OPS})
    # lora_ops: its sgmv_* ops call these through the module's globals; the other two imported them by name.
    for module in (lora_ops, package, punica_cpu):
        for name, fn in ops.items():
            if hasattr(module, name):
                setattr(module, name, fn)
    try:  # the model runner (the CPU runner subclasses it), where the prompt-logprob pass runs
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        if not getattr(GPUModelRunner._get_prompt_logprobs_dict, "_loraforge", False):
            GPUModelRunner._get_prompt_logprobs_dict = _note_prompt_pass(GPUModelRunner._get_prompt_logprobs_dict)
        punica_cpu.PunicaWrapperCPU.add_lora_logits = make_add_lora_logits(ops["bgmv_shrink"], ops["bgmv_expand"])
    except (ImportError, AttributeError) as e:  # another layout of vLLM's worker: keep its own logits op
        log.warning("loraforge: vLLM's model runner has no prompt-logprob pass to wrap (%s); its own LoRA logits "
                    "op stays in place (batched prompt log-probs may fail)", e)
    lora_ops._loraforge_grouped = True
    log.info("loraforge: vLLM CPU LoRA ops replaced by grouped ones (one matmul per adapter; no-adapter rows "
             "skipped, vllm#48421)")
    return True
