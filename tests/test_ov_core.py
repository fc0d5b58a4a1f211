"""OpenVINO Cores dropped out of order must not leave the thread on an unmapped signal stack
(compressor.ov_core). Each case runs in a child process: the failure is a segmentation fault at the
next signal, which would take the test runner down with it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("openvino")

PRELUDE = textwrap.dedent("""
    import gc, os, signal, sys
    import numpy as np
    import openvino as ov
    from openvino import opset13 as ops

    def model():
        p = ops.parameter([1, 4], np.float32)
        return ov.Model([ops.relu(p)], [p])

    def signal_survives():
        got = []
        signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
        os.kill(os.getpid(), signal.SIGUSR1)
        assert got == [1]
        print("survived")
""")


def _run(body: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)], capture_output=True, text=True,
                          timeout=120)


def test_runners_released_in_creation_order_leave_a_usable_signal_stack(tmp_path):
    """Two OVRunners (each compiling the IR) closed and dropped first-made-first: the process still
    handles a signal. With a Core per runner this died (the suite's segmentation fault)."""
    proc = _run(f"""
        from pathlib import Path
        from compressor.targets.openvino import OVRunner
        xml = Path({str(tmp_path)!r}) / "m.xml"
        ov.save_model(model(), str(xml))
        a = OVRunner(xml, threads=1); a.prepare(1)
        b = OVRunner(xml, threads=1); b.prepare(1)
        a.close(); del a; gc.collect()
        b.close(); del b; gc.collect()
        signal_survives()
    """)
    assert proc.returncode == 0 and "survived" in proc.stdout, proc.stderr[-2000:]


def test_kept_signal_stack_fences_cores_a_library_drops_out_of_order():
    """Raw Cores (as NNCF makes them) dropped first-made-first inside the guard: the thread gets its
    stack back and the next signal is handled."""
    proc = _run("""
        from compressor.ov_core import kept_signal_stack, signal_stack
        with kept_signal_stack():
            before = signal_stack()
            a = ov.Core(); ca = a.compile_model(model(), "CPU")
            b = ov.Core(); cb = b.compile_model(model(), "CPU")
            del ca, a; gc.collect()
            del cb, b; gc.collect()
        assert signal_stack() == before, (signal_stack(), before)
        signal_survives()
    """)
    assert proc.returncode == 0 and "survived" in proc.stdout, proc.stderr[-2000:]


def test_every_openvino_runner_uses_the_process_core(tmp_path):
    import openvino as ov
    from openvino import opset13 as ops

    from compressor.ov_core import core
    from compressor.targets.openvino import OpenVINOTapper, OVRunner

    p = ops.parameter([1, 4], ops.constant(0.0).get_element_type())
    ov.save_model(ov.Model([ops.relu(p)], [p]), str(tmp_path / "m.xml"))
    assert OVRunner(tmp_path / "m.xml", threads=1).core is core()
    assert OpenVINOTapper(tmp_path / "m.xml", threads=1).core is core()


def test_an_nncf_call_inside_the_pass_fence_gives_the_stack_back_at_once():
    """The NNCF pass runs inside one kept_signal_stack, and goes on after each NNCF call (validating with
    DataLoader workers, whose SIGCHLD comes in the middle): each call is fenced on its own
    (openvino_nncf._fenced), so a signal right after it is handled. Without the inner fence the
    MobileNetV2 accuracy-control run died so (benchmarks/accuracy_control.py)."""
    proc = _run("""
        from compressor.ov_core import kept_signal_stack
        from compressor.passes._ptq.openvino_nncf import _fenced

        def library_call():  # what NNCF does: Cores of its own, dropped first-made-first
            a = ov.Core(); ca = a.compile_model(model(), "CPU")
            b = ov.Core(); cb = b.compile_model(model(), "CPU")
            del ca, a; gc.collect()
            del cb, b; gc.collect()
            return "done"

        with kept_signal_stack():
            assert _fenced(library_call) == "done"
            signal_survives()
    """)
    assert proc.returncode == 0 and "survived" in proc.stdout, proc.stderr[-2000:]
