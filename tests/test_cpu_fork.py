"""The kernel's thread pool under several Python threads and across ``fork()`` (no caller may hang or see another's
results; a child forked while another thread is inside the kernel gets a fresh pool)."""

import ctypes
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from optimum_pot.format.activations import fake_quantize_activations_int8
from optimum_pot.format.packing import pack
from optimum_pot.format.registry import from_id
from optimum_pot.kernels.cpu import linear
from optimum_pot.library.reference import pot_linear_reference

LS = from_id("sp2:4:offset")


@pytest.fixture()
def lib(lib):
    """The operator library (conftest's), with the kernel on 2 threads (the pool in use) whatever torch's thread
    count is."""
    handle = lib
    previous = list(linear._THREADS)
    linear.set_num_threads(2)
    handle.pot_cpu_pool_helper_tasks.restype = ctypes.c_int64
    yield handle
    linear.set_num_threads(previous[0] if previous else None)


def layer(n, k, seed):
    gen = torch.Generator().manual_seed(seed)
    packed = pack(torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen), 4)
    scale = (torch.rand(n, k // 128, generator=gen) * 0.1).half()
    offset = ((torch.rand(n, k // 128, generator=gen) - 0.5) * 0.01).half()
    return packed, scale, offset


def run(args, x, backend=linear.pot_linear_cpu):
    packed, scale, offset = args
    return backend(x, packed, scale, offset, None, LS, 128, x.shape[-1])


@pytest.fixture(params=["own pool", "torch threads"])
def pool(request, lib, monkeypatch):
    """The kernels' parallel work on their own pool (a set_num_threads override, the ``lib`` fixture's) or on
    torch's intra-op threads (no override, torch on 2 threads); skips the latter where this build lacks it."""
    if request.param == "torch threads":
        lib.pot_op_torch_pool.restype = ctypes.c_int
        if not lib.pot_op_torch_pool():
            pytest.skip("this operator build runs its parallel work on its own pool only")
        monkeypatch.setattr(linear, "_ENV_THREADS", [None])
        linear.set_num_threads(None)
        previous = torch.get_num_threads()
        torch.set_num_threads(2)
        # no hand-over to the own pool when this machine is busy (tests that want one force it)
        lib.pot_op_set_late_ns.argtypes, lib.pot_op_set_late_ns.restype = [ctypes.c_int64], ctypes.c_int64
        late_ns = lib.pot_op_set_late_ns(1 << 62)
        yield request.param
        lib.pot_op_set_late_ns(late_ns)
        torch.set_num_threads(previous)
        linear.set_num_threads(2)  # the lib fixture restores its own setting afterwards
    else:
        yield request.param


def test_parallel_work_runs_on_torch_threads_without_an_override(lib, pool):
    """Without an override no helper of the kernels' own pool takes a task (torch's threads run them), with one
    they do; decode (fp32 and int8) and prefill results equal the reference either way."""
    helpers_before = lib.pot_cpu_pool_helper_tasks()
    args = layer(4096, 1024, 7)
    for m, backend in ((1, linear.pot_linear_cpu), (1, linear.pot_linear_cpu_int8), (40, linear.pot_linear_cpu)):
        x = torch.randn(m, 1024)
        xr = fake_quantize_activations_int8(x, 64) if backend is linear.pot_linear_cpu_int8 else x  # int8 rounds x
        ref = pot_linear_reference(xr, *args, None, LS, 128, 1024)
        for _ in range(5):
            torch.testing.assert_close(run(args, x, backend), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    if pool == "torch threads":
        assert lib.pot_cpu_pool_helper_tasks() == helpers_before
    else:
        assert _child_pool_has_helpers(lib, args, torch.randn(1, 1024))  # here: the parent's own pool


def test_late_torch_threads_hand_over_to_the_own_pool(lib, pool):
    """Torch's threads arriving late twice in a row (a busy machine; forced here: every wait counts as late) hand
    the next calls to the own pool; results stay right. With an override torch's threads are not used at all."""
    lib.pot_op_torch_pool_fallbacks.restype = ctypes.c_int64
    lib.pot_op_set_late_ns.argtypes, lib.pot_op_set_late_ns.restype = [ctypes.c_int64], ctypes.c_int64
    args, x = layer(2048, 1024, 3), torch.randn(1, 1024)
    ref = pot_linear_reference(x, *args, None, LS, 128, 1024)
    before = lib.pot_op_torch_pool_fallbacks()
    previous = lib.pot_op_set_late_ns(-1)
    try:
        for _ in range(4):  # late, late (hand-over), then two calls on the own pool
            torch.testing.assert_close(run(args, x), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
        assert lib.pot_op_torch_pool_fallbacks() - before == (1 if pool == "torch threads" else 0)
    finally:
        lib.pot_op_set_late_ns(previous)


def test_concurrent_callers_get_their_own_results(lib, pool):
    """Four Python threads call the kernel at once (decode, int8 and prefill rows): each result equals the
    reference, whichever caller held the pool (or with each caller's own team of torch's threads)."""
    cases = []
    for i in range(8):
        args, m = layer(256 + 64 * i, 512, i), (1, 3, 12, 40)[i % 4]
        x = torch.randn(m, 512)
        cases.append((args, x, pot_linear_reference(x, args[0], args[1], args[2], None, LS, 128, 512)))

    def work(i):
        args, x, ref = cases[i % len(cases)]
        torch.testing.assert_close(run(args, x), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
        return i

    with ThreadPoolExecutor(4) as executor:
        assert sorted(executor.map(work, range(48))) == list(range(48))


def _wait_all(pids, timeout):
    """Exit codes of ``pids``; children still running after ``timeout`` seconds are killed and reported as None."""
    codes, deadline = {}, time.monotonic() + timeout
    while len(codes) < len(pids) and time.monotonic() < deadline:
        for pid in pids:
            if pid not in codes:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes[pid] = os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    for pid in pids:
        if pid not in codes:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            codes[pid] = None
    return [codes[p] for p in pids]


def _child_pool_has_helpers(lib, args, x, seconds=20.0) -> bool:
    """Whether a helper thread of this (forked) process's pool runs kernel tasks within ``seconds``: the parent's
    helpers do not exist here, so this holds only if the pool was rebuilt after fork()."""
    start, deadline = lib.pot_cpu_pool_helper_tasks(), time.monotonic() + seconds
    while time.monotonic() < deadline:
        run(args, x)
        if lib.pot_cpu_pool_helper_tasks() > start:
            return True
    return False


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_fork_while_another_thread_is_in_the_kernel(lib):
    """16 children forked while a second thread keeps the pool busy: each runs the kernel on 2 threads (fp32 and
    int8 paths), checks its result and that its pool's helpers work (exit code 3 if not); none may hang."""
    busy_args, busy_x = layer(2048, 2048, 0), torch.randn(1, 2048)
    args, x = layer(1024, 512, 1), torch.randn(2, 512)  # 512K weights: a pool job of 8 tasks
    expected = run(args, x)
    expected_i8 = run(args, x, linear.pot_linear_cpu_int8)
    stop = threading.Event()
    calls = [0]

    def keep_busy():
        while not stop.is_set():
            run(busy_args, busy_x)
            calls[0] += 1

    thread = threading.Thread(target=keep_busy)
    thread.start()
    pids = []
    try:
        for i in range(16):
            time.sleep(0.002 * (i % 5))  # fork at different points of the busy thread's calls
            pid = os.fork()
            if pid == 0:  # child: only this thread exists; the pool must not wait for the parent's helpers
                code = 1
                try:
                    if torch.equal(run(args, x), expected) and torch.equal(
                        run(args, x, linear.pot_linear_cpu_int8), expected_i8
                    ):
                        code = 0 if _child_pool_has_helpers(lib, args, x) else 3
                finally:
                    os._exit(code)
            pids.append(pid)
    finally:
        stop.set()
        thread.join()
    codes = _wait_all(pids, timeout=120)
    assert calls[0] > 0
    assert codes == [0] * len(pids), f"children exit codes (None: hung and killed): {codes}"
