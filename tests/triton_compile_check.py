"""GPU-side checks that need no GPU; run by ``tests/test_triton_kernel.py`` in a process without the interpreter.

1. ``import optimum_pot`` registers the triton backend but loads no kernel and initialises no CUDA.
2. ``torch.compile`` traces ``optimum_pot::pot_linear_triton`` into the Triton kernels (HOP nodes in the AOT graph),
   and ``pot_linear`` / ``pot_linear_infer`` on fake CUDA tensors decompose into them for every registered family,
   with and without offsets.
3. The kernels compile ahead of time to NVIDIA cubins (Triton ships ``ptxas``) for sm_80 and sm_90, with the GPU's
   native bfloat16 conversions and ``tl.dot`` (the paths the CPU interpreter replaces): single-term and two-term
   (with offsets) decodes, the uniform baseline and the guarded decode. Registers and spills are printed, not
   asserted (they depend on the Triton version; with 3.9 there are no spills).

Prints one line per check; exits non-zero on failure.
"""

import re
import subprocess
import sys
import tempfile

import torch

import optimum_pot  # noqa: F401
from optimum_pot.library.ops import _KERNELS

assert ("cuda", "triton") in _KERNELS and ("cpu", "triton") in _KERNELS
assert "optimum_pot.kernels.triton.launch" not in sys.modules, "importing optimum_pot loaded the Triton kernels"
assert not torch.cuda.is_initialized()
print("lazy import ok")

import triton  # noqa: E402
from torch._functorch.aot_autograd import aot_module_simplified  # noqa: E402
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table  # noqa: E402

from optimum_pot.format.packing import pack  # noqa: E402
from optimum_pot.format.registry import from_id  # noqa: E402
from optimum_pot.kernels.triton import launch, matmul  # noqa: E402


def traced_kernels(m: int) -> list[str]:
    """Names of the Triton kernels in the forward graph ``torch.compile`` builds for ``M = m``."""
    graphs = []

    def capture(gm, inputs):
        def fw(g, _):
            graphs.append(g)
            raise SystemExit(0)  # only the graph is wanted: running it would need a GPU

        return aot_module_simplified(gm, inputs, fw_compiler=fw)

    packed = pack(torch.randint(0, 16, (37, 77), dtype=torch.uint8), 4)
    scale, offset = torch.rand(37, 3).half(), torch.rand(37, 3).half()
    f = lambda x: torch.ops.optimum_pot.pot_linear_triton(x, packed, scale, offset, None, "sp2:4:offset", 32, 77)
    try:
        torch.compile(f, backend=capture, fullgraph=True)(torch.randn(m, 77).half())
    except SystemExit:
        pass
    nodes = [n for n in graphs[-1].graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    return [kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__ for n in nodes]


assert traced_kernels(1) == ["gemv_kernel"] and traced_kernels(64) == ["gemm_kernel"]
print("torch.compile traces ok")


def exported_targets(backend: str, m: int, ls, op=None) -> list[str]:
    """Targets of the functionalised graph of ``op`` (``pot_linear`` or ``pot_linear_infer``) on fake CUDA tensors
    (what torch.compile lowers)."""
    from torch._functorch.aot_autograd import aot_export_module
    from torch._subclasses.fake_tensor import FakeTensorMode

    from optimum_pot.library.ops import pot_linear

    op = op or pot_linear

    class Layer(torch.nn.Module):
        def __init__(self, packed, scale, offset):
            super().__init__()
            self.register_buffer("packed", packed)
            self.register_buffer("scale", scale)
            self.register_buffer("offset", offset)

        def forward(self, x):
            return (op(x, self.packed, self.scale, self.offset, None, ls.id, 32, 77, backend),)

    with FakeTensorMode(allow_non_fake_inputs=True):
        packed = torch.empty(37, 10 * ls.bits, dtype=torch.uint8, device="cuda")
        scale = torch.empty(37, 3, dtype=torch.float16, device="cuda")
        offset = torch.empty(37, 3, dtype=torch.float16, device="cuda") if ls.offset else None
        gm, _ = aot_export_module(
            Layer(packed, scale, offset), [torch.empty(m, 77, dtype=torch.float16, device="cuda")], trace_joint=False
        )
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    return [
        kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__ if "triton_kernel" in str(n.target) else
        str(n.target) for n in nodes
    ]  # fmt: skip


import optimum_pot.kernels.triton as triton_backend  # noqa: E402
from optimum_pot.format.registry import families, get_level_set  # noqa: E402
from optimum_pot.library.ops import pot_linear_infer  # noqa: E402

triton_backend.cuda_available = lambda: True  # pretend: the graph is only traced, never run
for family in families():  # every family, with and without offsets
    for ls in (get_level_set(family, 4, offset=False), get_level_set(family, 3, offset=True)):
        assert "gemm_kernel" in exported_targets("auto", 64, ls), ls.id
        assert "gemv_kernel" in exported_targets("triton", 1, ls), ls.id
assert "gemv_kernel" in exported_targets("auto", 1, get_level_set("sp2", 4), op=pot_linear_infer)
assert exported_targets("reference", 64, get_level_set("sp2", 4)) == ["optimum_pot.pot_linear.default"]
print("pot_linear decomposes into the kernels on CUDA ok")

TORCH_TO_TRITON = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def compile_kernel(kernel, pointers: dict, constexprs: dict, arch: int, num_warps: int, num_stages: int = 3):
    """Ahead-of-time compile to a cubin; pointer arguments typed by ``pointers``, the rest ``i32``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {
        a: "constexpr" if a in constexprs else pointers.get(a, "i32") for a in kernel.arg_names
    }  # fmt: skip
    src = ASTSource(kernel, signature, constexprs)
    opts = dict(num_warps=num_warps, num_stages=num_stages)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)


def resource_usage(compiled) -> tuple[int, int]:
    """Registers per thread and spilled bytes reported by ``cuobjdump -res-usage`` (shipped with Triton)."""
    tool = str(triton.__path__[0]) + "/backends/nvidia/bin/cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    return int(re.search(r"REG:(\d+)", out).group(1)), int(re.search(r"STACK:(\d+)", out).group(1))


def meta(level_id: str, mode: int = 0, half_safe: bool = True) -> dict:
    """The constexprs the launcher passes for level set ``level_id`` with float16 scales."""
    ls = from_id(level_id)
    return dict(GROUP=128, BITS=ls.bits, TERMS=ls.max_terms, HALF_SAFE=half_safe, HAS_OFFSET=ls.offset and mode == 0,
                MODE=mode, INTERPRETED=False)  # fmt: skip


CASES = [  # (kernel, activation dtype, level set, mode, M, arch); mode 1 is the uniform int4 baseline
    ("gemm", torch.float16, "pot:3", 0, 128, 90),
    ("gemm", torch.bfloat16, "pot:4", 0, 16, 80),
    ("gemm", torch.float16, "sp2:4:offset", 0, 128, 90),
    ("gemm", torch.bfloat16, "sp2:4:offset", 0, 64, 80),
    ("gemm", torch.float16, "int:4:offset", 1, 64, 90),
    ("gemv", torch.float16, "pot:2", 0, 1, 90),
    ("gemv", torch.bfloat16, "pot:3", 0, 8, 80),
    ("gemv", torch.float16, "sp2:4:offset", 0, 1, 90),
    ("dequant", torch.bfloat16, "pot:3", 0, 0, 90),
    ("dequant", torch.float16, "sp2:3:offset", 0, 0, 90),
]


def compile_case(name: str, dtype: torch.dtype, level_id: str, mode: int, m: int, arch: int, half_safe: bool = True):
    act = "*" + TORCH_TO_TRITON[dtype]
    ptrs = {"x_ptr": act, "w_ptr": "*u8", "s_ptr": "*fp16", "z_ptr": "*fp16", "t_ptr": "*i32", "b_ptr": act,
            "y_ptr": act}  # fmt: skip
    cx = meta(level_id, mode, half_safe)
    if name == "gemm":
        cfg = launch.gemm_config(m, 4096, 128, dtype)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        return compile_kernel(matmul.gemm_kernel, ptrs, dict(cx, HAS_BIAS=True, FP32_DOT=False, **cfg), arch, warps,
                              stages)  # fmt: skip
    if name == "gemv":
        cfg = launch.gemv_config(m, 4096, 4096, 128)
        cfg.pop("split"), cfg.pop("k_per_split")
        return compile_kernel(matmul.gemv_kernel, dict(ptrs, y_ptr="*fp32"), dict(cx, HAS_BIAS=True, SPLIT=True, **cfg),
                              arch, 4)  # fmt: skip
    ptrs = {"w_ptr": "*u8", "s_ptr": "*fp16", "z_ptr": "*fp16", "t_ptr": "*i32", "out_ptr": act}
    return compile_kernel(matmul.dequant_kernel, ptrs, dict(cx, BN=32, BK=128), arch, 4)


for name, dtype, level_id, mode, m, arch in CASES:
    compiled = compile_case(name, dtype, level_id, mode, m, arch)
    assert compiled.asm["cubin"], f"no cubin for {name}"
    regs, spills = resource_usage(compiled)
    print(f"compiled {name} {TORCH_TO_TRITON[dtype]} {level_id} mode={mode} M={m} sm_{arch}: {regs} registers, "
          f"{spills} bytes spilled")  # fmt: skip
# The guarded decode (bfloat16/float32 scales) compiles too.
compiled = compile_case("dequant", torch.float16, "int:4:offset", 0, 0, 80, half_safe=False)
print(f"compiled guarded dequant fp16 int:4:offset sm_80: {resource_usage(compiled)[0]} registers")
