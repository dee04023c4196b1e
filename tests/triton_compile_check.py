"""GPU-side checks that need no GPU; run by ``tests/test_triton_kernel.py`` in a process without the interpreter.

1. ``import optimum_pot`` registers the triton backend but loads no kernel and initialises no CUDA.
2. ``torch.compile`` traces ``optimum_pot::pot_linear_triton`` into the Triton kernels (HOP nodes in the AOT graph).
3. The kernels compile ahead of time to NVIDIA cubins (Triton ships ``ptxas``) for sm_80 and sm_90, with the GPU's
   native bfloat16 conversions and ``tl.dot`` (the paths the CPU interpreter replaces). Register spills are printed,
   not asserted (they depend on the Triton version; with 3.9 there are none).

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
    scale = torch.rand(37, 3).half()
    f = lambda x: torch.ops.optimum_pot.pot_linear_triton(x, packed, scale, None, 4, 32, 77, True)
    try:
        torch.compile(f, backend=capture, fullgraph=True)(torch.randn(m, 77).half())
    except SystemExit:
        pass
    nodes = [n for n in graphs[-1].graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    return [kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__ for n in nodes]


assert traced_kernels(1) == ["gemv_kernel"] and traced_kernels(64) == ["gemm_kernel"]
print("torch.compile traces ok")


def exported_targets(backend: str, m: int) -> list[str]:
    """Targets of the functionalised graph of ``pot_linear`` on fake CUDA tensors (what torch.compile lowers)."""
    from torch._functorch.aot_autograd import aot_export_module
    from torch._subclasses.fake_tensor import FakeTensorMode

    from optimum_pot.library.ops import pot_linear

    class Layer(torch.nn.Module):
        def __init__(self, packed, scale):
            super().__init__()
            self.register_buffer("packed", packed)
            self.register_buffer("scale", scale)

        def forward(self, x):
            return (pot_linear(x, self.packed, self.scale, None, 4, 32, 77, True, backend),)

    with FakeTensorMode(allow_non_fake_inputs=True):
        packed = torch.empty(37, 40, dtype=torch.uint8, device="cuda")
        scale = torch.empty(37, 3, dtype=torch.float16, device="cuda")
        gm, _ = aot_export_module(
            Layer(packed, scale), [torch.empty(m, 77, dtype=torch.float16, device="cuda")], trace_joint=False
        )
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    return [
        kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__ if "triton_kernel" in str(n.target) else
        str(n.target) for n in nodes
    ]  # fmt: skip


import optimum_pot.kernels.triton as triton_backend  # noqa: E402

triton_backend.cuda_available = lambda: True  # pretend: the graph is only traced, never run
assert "gemm_kernel" in exported_targets("auto", 64) and "gemv_kernel" in exported_targets("triton", 1)
assert exported_targets("reference", 64) == ["optimum_pot.pot_linear.default"]
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


def spill_bytes(compiled) -> int:
    """Spilled bytes reported by ``cuobjdump -res-usage`` (shipped with Triton's NVIDIA backend)."""
    tool = str(triton.__path__[0]) + "/backends/nvidia/bin/cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    return int(re.search(r"STACK:(\d+)", out).group(1))


def meta(bits: int, mode: int = 0) -> dict:
    return dict(GROUP=128, BITS=bits, ZERO_LEVEL=True, SCALE_IS_HALF=True, MODE=mode, INTERPRETED=False)


CASES = [  # (kernel, activation dtype, bits, mode, M, arch)
    ("gemm", torch.float16, 3, 0, 128, 90),
    ("gemm", torch.bfloat16, 4, 0, 16, 80),
    ("gemm", torch.float16, 4, 1, 64, 90),  # the uniform int4 baseline
    ("gemv", torch.float16, 2, 0, 1, 90),
    ("gemv", torch.bfloat16, 3, 0, 8, 80),
    ("dequant", torch.bfloat16, 3, 0, 0, 90),
]

for name, dtype, bits, mode, m, arch in CASES:
    act = "*" + TORCH_TO_TRITON[dtype]
    ptrs = {"x_ptr": act, "w_ptr": "*u8", "s_ptr": "*fp16", "z_ptr": "*fp16", "b_ptr": act, "y_ptr": act}
    if name == "gemm":
        cfg = launch.gemm_config(m, 4096, 128, dtype)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        cx = dict(meta(bits, mode), HAS_BIAS=True, FP32_DOT=False, **cfg)
        compiled = compile_kernel(matmul.gemm_kernel, ptrs, cx, arch, warps, stages)
    elif name == "gemv":
        cfg = launch.gemv_config(m, 4096, 4096, 128)
        cfg.pop("split"), cfg.pop("k_per_split")
        cx = dict(meta(bits, mode), HAS_BIAS=True, SPLIT=True, **cfg)
        compiled = compile_kernel(matmul.gemv_kernel, dict(ptrs, y_ptr="*fp32"), cx, arch, 4)
    else:
        ptrs = {"w_ptr": "*u8", "s_ptr": "*fp16", "z_ptr": "*fp16", "out_ptr": act}
        compiled = compile_kernel(matmul.dequant_kernel, ptrs, dict(meta(bits, mode), BN=32, BK=128), arch, 4)
    assert compiled.asm["cubin"], f"no cubin for {name}"
    spills = spill_bytes(compiled)
    print(f"compiled {name} {TORCH_TO_TRITON[dtype]} {bits}-bit mode={mode} M={m} sm_{arch}: {spills} bytes spilled")
