"""Fused projections for serving: one packed matmul for sibling ``PoTLinear`` layers that read the same input.

Why: at decode a small model's projections are GEMVs of a few hundred microseconds or less, and each call pays a
fixed cost (dispatch, threading, reading the activation). A Llama block calls ``q_proj``, ``k_proj`` and
``v_proj`` on the same hidden state, and ``gate_proj`` and ``up_proj`` on another: run as one matmul over the
stacked rows, they save ~40 us per SmolLM2 block (docs/cpu_kernel.md). The model code stays untouched: the first
member called computes the whole group's output and caches it by the identity (and version) of its input; the
other members return their slice of it. A member called with any other input, a training call (autograd) or a
group whose members diverged (a member re-quantised, a backend switched) just runs its own matmul. The rows of a
matmul are independent, so decode results are bit-identical (tested); prefill goes through the BLAS GEMM, which may
round a wider matrix's edge columns differently (one ulp at most in the tests).

Memory: the stacked tensors are the storage; each member's parameters become row-views of them, so nothing is
duplicated, and ``state_dict`` hands out independent copies (same keys and values as before fusing) so checkpoints
never see shared storage. A ``.to()``/cast that moves the members re-stacks the group on its next call.
"""

import torch
from torch import nn

from .pot_linear import PoTLinear, infer_linear

#: Sibling layers that read the same input in common architectures (Llama/Mistral/Qwen/Gemma attention and MLP,
#: BERT-style attention, Mixtral-style experts).
DEFAULT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"), ("w1", "w3"))

_TENSORS = ("weight", "weight_scale", "weight_offset", "bias")


class FusedProjections(nn.Module):
    """The stacked packed tensors of a group of ``PoTLinear`` layers, registered on their parent module.

    Its buffers are non-persistent (never saved); the members are referenced, not registered, so
    ``named_modules()`` and ``state_dict()`` keep their keys.

    Args:
        members (`list[PoTLinear]`): layers with the same format, ``in_features``, backend, device and bias
            presence (:func:`can_fuse`).
    """

    def __init__(self, members: list[PoTLinear]):
        super().__init__()
        self._members = tuple(members)  # a tuple: not registered as submodules
        bounds, start = [], 0
        for m in members:  # output rows [a, b) of each member in the stacked output
            bounds.append((start, start + m.out_features))
            start += m.out_features
        self.bounds, self.out_features = tuple(bounds), start
        self._clear()
        self.stack()

    def _clear(self) -> None:
        self._key, self._y, self._served = None, None, set()

    @torch.no_grad()
    def stack(self) -> None:
        """(Re)builds the stacked tensors from the members and makes the members' parameters views of them."""
        self._clear()
        views = []
        for name in _TENSORS:
            params = [getattr(m, name) for m in self._members]
            if params[0] is None:
                self.register_buffer(name, None, persistent=False)
                continue
            stacked = torch.cat([p.data for p in params])  # [sum of out_features, ...]
            self.register_buffer(name, stacked, persistent=False)
            for p, (a, b) in zip(params, self.bounds):
                p.data = stacked[a:b]  # a contiguous row slice: the member keeps its values, shares the storage
                views.append(p)
        self._views = tuple((p, p.data_ptr()) for p in views)

    def _current(self) -> bool:
        """Whether every member still reads its rows of the stacked tensors (nothing replaced, moved or cast)."""
        for m in self._members:
            if m._fused is None or m._fused[0] is not self:
                return False
        params = [getattr(m, n) for n in _TENSORS for m in self._members if getattr(m, n) is not None]
        if len(params) != len(self._views):
            return False
        return all(p is q and p.data_ptr() == ptr for p, (q, ptr) in zip(params, self._views))

    def _same_settings(self) -> bool:
        first = self._members[0]
        return all(m.backend == first.backend and m.level_set == first.level_set for m in self._members)

    def run(self, x: torch.Tensor, index: int) -> torch.Tensor | None:
        """Member ``index``'s output for input ``x`` (``[..., K] -> [..., N_index]``), or ``None`` when the member
        must run alone (settings diverged)."""
        compiling = torch.compiler.is_compiling()
        version = None if compiling else x._version  # an in-place edit of the input invalidates the cache
        key = self._key
        if key is None or key[0] is not x or key[1] != version or index in self._served:
            # A new input: check the group (cheap, once per input) and compute every member's rows at once.
            if not self._same_settings():
                return None
            if not compiling and not self._current():
                self.stack()  # a member was re-quantised, moved or cast: stack again (rare)
            first = self._members[0]
            self._y = infer_linear(x, self.weight, self.weight_scale, self.weight_offset, self.bias,
                                   first.level_set, first.group_size, first.in_features, self.out_features,
                                   first.backend)  # fmt: skip  # [..., sum of out_features]
            self._key, self._served = (x, version), set()
        a, b = self.bounds[index]
        y = self._y[..., a:b]  # [..., N_index], a view (a row block of each token's output)
        self._served.add(index)
        if len(self._served) == len(self._members):
            self._clear()  # every member served: do not hold the activation
        return y

    def extra_repr(self) -> str:
        return f"members={len(self._members)}, out_features={self.out_features} (serving copy, not saved)"


def can_fuse(members: list[nn.Module]) -> bool:
    """Whether ``members`` are packed ``PoTLinear`` layers that one matmul can serve."""
    if len(members) < 2 or not all(type(m) is PoTLinear for m in members):
        return False
    first = members[0]
    if first.weight.dtype != torch.uint8 or first.weight.device.type == "meta":
        return False  # a skeleton or a float placeholder: nothing packed yet
    keys = {(m.level_set, m.group_size, m.in_features, m.backend, m.bias is None, m.weight.device,
             None if m.bias is None else m.bias.dtype) for m in members}  # fmt: skip
    return len(keys) == 1 and all(m._fused is None for m in members)


def _clone_state(module, state_dict, prefix, local_metadata):
    """``state_dict`` hook of a fused member: independent copies, so savers never see storage shared by members."""
    for name in _TENSORS:
        key = prefix + name
        value = state_dict.get(key)
        if value is not None and not isinstance(value, nn.Parameter):  # keep_vars=True asks for the parameters
            state_dict[key] = value.clone()
    return state_dict


def fuse_projections(model: nn.Module, groups=DEFAULT_GROUPS) -> list[str]:
    """Fuses, in every module of ``model``, the ``PoTLinear`` children named in one of ``groups``.

    A serving optimisation (see the module docstring): results are unchanged, checkpoints are unchanged, training
    calls run unfused. Idempotent; :func:`unfuse_projections` undoes it.

    Args:
        model (`nn.Module`): a quantised model.
        groups (tuple of tuples of `str`): child names that read the same input; default :data:`DEFAULT_GROUPS`.

    Returns:
        The names of the fused groups (e.g. ``"model.layers.0.self_attn.pot_fused_q_k_v"``).
    """
    done = []
    for parent_name, parent in list(model.named_modules()):
        for names in groups:
            members = [getattr(parent, n, None) for n in names]
            if not can_fuse(members):
                continue
            fused = FusedProjections(members)
            attr = "pot_fused_" + "_".join(n.removesuffix("_proj") for n in names)
            parent.add_module(attr, fused)
            for i, m in enumerate(members):
                m._fused = (fused, i)
                m._fused_hook = m._register_state_dict_hook(_clone_state)
            done.append(f"{parent_name}.{attr}" if parent_name else attr)
    return done


@torch.no_grad()
def unfuse_projections(model: nn.Module) -> nn.Module:
    """Undoes :func:`fuse_projections`: members get their own storage back and the stacked tensors are freed."""
    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            if not isinstance(child, FusedProjections):
                continue
            for m in child._members:
                if m._fused is not None and m._fused[0] is child:
                    for name in _TENSORS:
                        p = getattr(m, name)
                        if p is not None:
                            p.data = p.data.clone()
                    m._fused_hook.remove()
                    del m._fused, m._fused_hook
            delattr(parent, attr)
    return model
