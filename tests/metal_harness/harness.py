"""Run the exact Metal source of an `mx.fast.metal_kernel` call as sanitized C++ on the CPU.

While a function is traced by `mx.export_function`, a kernel call with ``verbose=True`` prints
the source MLX would compile for Metal. `Harness.launch` captures it, checks it stays in the
supported subset (see `mlx_compact.kernels`), strips the ``[[...]]`` attributes so the kernel
becomes a plain C++ template function taking ``thread_position_in_grid``, builds it against
``metal_stub.h`` and links it with ``launcher.cpp`` (built once) using
``-fsanitize=address,undefined``, and runs it over the whole grid in forward, reverse and
shuffled thread order. Each input is its own exactly-sized heap buffer, so any read or write
out of bounds aborts; outputs start filled with a different byte pattern per order, so an
unwritten or order-dependent output element shows up as a mismatch between orders.
"""

import ctypes
import hashlib
import os
import re
import subprocess
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

HERE = Path(__file__).resolve().parent
ORDERS = ("forward", "reverse", "shuffle")

_C_TYPES = {
    "float": (np.float32, 4),
    "float16_t": (np.uint16, 2),
    "half": (np.uint16, 2),
    "bfloat16_t": (np.uint16, 2),
    "bfloat": (np.uint16, 2),
    "int": (np.int32, 4),
    "int32_t": (np.int32, 4),
    "uint": (np.uint32, 4),
    "uint32_t": (np.uint32, 4),
    "int64_t": (np.int64, 8),
    "uint64_t": (np.uint64, 8),
    "int16_t": (np.int16, 2),
    "uint16_t": (np.uint16, 2),
    "int8_t": (np.int8, 1),
    "uint8_t": (np.uint8, 1),
    "bool": (np.bool_, 1),
}

_UNSUPPORTED = (
    (r"\bthreadgroup\b", "threadgroup memory"),
    (r"\bthreadgroup_barrier\b|\bsimdgroup_barrier\b", "barriers"),
    (r"\bsimd_\w+|\bquad_\w+", "SIMD-group functions"),
    (r"\batomic\w*", "atomics"),
)
_PARAM = re.compile(
    r"^\s*(?P<const>const\s+)?(?P<space>device|constant)\s+(?P<type>\w+)\s*(?P<ref>[*&])\s*"
    r"(?P<name>\w+)\s*\[\[buffer\(\d+\)\]\]\s*,?\s*$"
)
_THREAD = re.compile(r"^\s*uint3\s+thread_position_in_grid\s*\[\[thread_position_in_grid\]\]\s*\)?\s*$")


class HarnessError(AssertionError):
    """The kernel failed a harness check: subset, compile, sanitizer or thread order."""


def capture_stdout(fn) -> str:
    """Run ``fn()`` and return what was written to file descriptor 1 (C++ output included)."""
    libc = ctypes.CDLL(None)
    with tempfile.TemporaryFile() as tmp:
        libc.fflush(None)
        saved = os.dup(1)
        os.dup2(tmp.fileno(), 1)
        try:
            fn()
        finally:
            libc.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)
        tmp.seek(0)
        return tmp.read().decode()


def metal_sources(kernel, **call) -> list:
    """The Metal source(s) MLX generates for ``kernel(**call)``, captured while tracing."""
    arrays = [a for a in call["inputs"] if isinstance(a, mx.array)]

    def traced(*arrs):
        it = iter(arrs)
        inputs = [next(it) if isinstance(a, mx.array) else a for a in call["inputs"]]
        return kernel(**{**call, "inputs": inputs, "verbose": True})

    text = capture_stdout(lambda: mx.export_function(lambda *a: None, traced, *arrays))
    return re.findall(r"```\n(.*?)```", text, flags=re.S)


def check_subset(source: str):
    """Raise HarnessError where the source leaves the supported kernel subset."""
    for pattern, what in _UNSUPPORTED:
        if re.search(pattern, source):
            raise HarnessError(f"unsupported in the harness: {what}")
    attrs = set(re.findall(r"\[\[\s*(\w+)", source))
    extra = attrs - {"kernel", "buffer", "thread_position_in_grid", "host_name"}
    if extra:
        raise HarnessError(f"unsupported attributes: {sorted(extra)}")
    header = source[: source.index("[[kernel]]")]
    for fn, params in re.findall(r"(\w+)\s*\(([^()]*)\)\s*(?:const\s*)?\{", header):
        for param in params.split(","):
            if re.search(r"\b(device|constant)\b", param):
                raise HarnessError(
                    f"helper {fn}() takes {param.strip()!r}: an input may arrive in device or "
                    "constant memory, so helpers must take pointers as a template parameter"
                )


def _parse(source: str):
    inst = re.search(r"^template \[\[host_name.*?decltype\((\w+)(<.*?>)?\).*$", source, flags=re.M)
    if inst:
        name, targs = inst.group(1), inst.group(2) or ""
        body = source[: inst.start()] + source[inst.end() :]
    else:
        name = re.search(r"\[\[kernel\]\]\s*void\s+(\w+)\s*\(", source).group(1)
        targs, body = "", source
    sig = re.search(r"\[\[kernel\]\]\s*void\s+\w+\s*\((.*?)\)\s*\{", body, flags=re.S).group(1)
    params = []
    for line in sig.strip().splitlines():
        m = _PARAM.match(line)
        if m:
            params.append(m.groupdict())
        elif _THREAD.match(line):
            params.append({"name": "thread_position_in_grid"})
        else:
            raise HarnessError(f"cannot parse kernel parameter {line.strip()!r}")
    body = re.sub(r"\[\[[^\[\]]*\]\]", "", body)
    return name, targs, params, body


def _cpp(source: str) -> str:
    name, targs, params, body = _parse(source)
    args, j = [], 0
    for p in params:
        if p["name"] == "thread_position_in_grid":
            args.append("t")
            continue
        ctype = ("const " if p["const"] else "") + p["type"]
        args.append(f"{'*' if p['ref'] == '&' else ''}({ctype}*)buffers[{j}]")
        j += 1
    call = f"{name}{targs}({', '.join(args)})"
    return f'#include "metal_stub.h"\n{body}\nextern "C" void harness_entry(void** buffers, uint3 t) {{ {call}; }}\n'


def _raw(a) -> np.ndarray:
    a = mx.contiguous(a) if isinstance(a, mx.array) else a
    if a.dtype in (mx.float16, mx.bfloat16):
        a = a.view(mx.uint16)
    return np.ascontiguousarray(np.array(a))


def _from_raw(data: bytes, shape, dtype) -> mx.array:
    if dtype in (mx.float16, mx.bfloat16):
        return mx.array(np.frombuffer(data, np.uint16).reshape(shape)).view(dtype)
    np_dtype = {mx.uint32: np.uint32, mx.int32: np.int32, mx.float32: np.float32}[dtype]
    return mx.array(np.frombuffer(data, np_dtype).reshape(shape))


class Harness:
    """Builds (once per source) and runs kernels; objects and binaries live under ``workdir``."""

    FLAGS = [
        "-std=c++17",
        "-O1",
        "-g",
        "-fno-omit-frame-pointer",
        "-ffp-contract=off",
        "-fsanitize=address,undefined",
        "-fno-sanitize-recover=all",
    ]

    def __init__(self, workdir):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.binaries = {}
        self.compiles = 0
        self.launcher = None

    def _gxx(self, *args):
        res = subprocess.run(["g++", *self.FLAGS, f"-I{HERE}", *map(str, args)], capture_output=True, text=True)
        if res.returncode:
            raise HarnessError(f"C++ build failed:\n{res.stderr[-4000:]}")

    def build(self, source: str) -> Path:
        """Check ``source`` against the subset and build it (cached by content)."""
        check_subset(source)
        key = hashlib.sha256(source.encode()).hexdigest()[:16]
        if key not in self.binaries:
            if self.launcher is None:
                self.launcher = self.workdir / "launcher.o"
                self._gxx("-c", HERE / "launcher.cpp", "-o", self.launcher)
            cpp, exe = self.workdir / f"k_{key}.cpp", self.workdir / f"k_{key}"
            cpp.write_text(_cpp(source))
            self._gxx(cpp, self.launcher, "-o", exe)
            self.compiles += 1
            self.binaries[key] = exe
        return self.binaries[key]

    def run_source(self, source, inputs, output_shapes, output_dtypes, grid):
        """Run ``source`` over ``grid`` with the kernel call's ``inputs``; return the outputs."""
        exe = self.build(source)
        _, _, params, _ = _parse(source)
        params = [p for p in params if p["name"] != "thread_position_in_grid"]
        values, outputs = [], list(zip(output_shapes, output_dtypes))
        it_in, it_out, prev = iter(inputs), iter(outputs), None
        for p in params:
            if not p["const"]:
                shape, dtype = next(it_out)
                values.append(np.zeros(int(np.prod(shape)) * dtype.size, np.uint8))
            elif prev is not None and p["name"].endswith(("_shape", "_strides", "_ndim")):
                attr = p["name"].rsplit("_", 1)[1]
                raw = {"shape": prev.shape, "strides": _strides(prev.shape), "ndim": prev.ndim}[attr]
                values.append(np.array(raw, _C_TYPES[p["type"]][0]).reshape(-1))
            else:
                prev = next(it_in)
                if isinstance(prev, mx.array):
                    raw = _raw(prev)
                else:
                    raw = np.array(prev).astype(_C_TYPES[p["type"]][0])
                    prev = raw
                if raw.dtype.itemsize != _C_TYPES[p["type"]][1]:
                    raise HarnessError(f"{p['name']}: {raw.dtype} does not fit {p['type']}")
                values.append(raw)
        kinds = "".join("i" if p["const"] else "o" for p in params)
        g = [str(int(v)) for v in (tuple(grid) + (1, 1))[:3]]
        env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=0", "UBSAN_OPTIONS": "print_stacktrace=1"}
        with tempfile.TemporaryDirectory(dir=self.workdir) as tmp:
            for j, v in enumerate(values):
                (Path(tmp) / f"p{j}.bin").write_bytes(v.tobytes())
            res = subprocess.run([str(exe), tmp, *g, kinds], capture_output=True, text=True, env=env)
            if res.returncode:
                raise HarnessError(f"kernel run failed (rc {res.returncode}):\n{res.stderr[-4000:]}")
            results = []
            out_idx = [j for j, k in enumerate(kinds) if k == "o"]
            for j, (shape, dtype) in zip(out_idx, outputs):
                runs = {o: (Path(tmp) / f"p{j}.{o}.out").read_bytes() for o in ORDERS}
                for o in ORDERS[1:]:
                    if runs[o] != runs[ORDERS[0]]:
                        raise HarnessError(
                            f"output {params[j]['name']} differs between {ORDERS[0]} and {o} "
                            "thread order: an element is unwritten, written twice, or order dependent"
                        )
                results.append(_from_raw(runs[ORDERS[0]], shape, dtype))
        return results

    def launch(self, kernel, *, inputs, grid, output_shapes, output_dtypes, **call):
        """Drop-in for ``kernel(inputs=..., grid=..., ...)`` that runs the generated source here."""
        call = dict(call, inputs=inputs, grid=grid, output_shapes=output_shapes, output_dtypes=output_dtypes)
        call.pop("verbose", None)
        (source,) = metal_sources(kernel, **call)
        return self.run_source(source, inputs, output_shapes, output_dtypes, grid)


def _strides(shape):
    out, acc = [], 1
    for s in reversed(shape):
        out.append(acc)
        acc *= s
    return out[::-1]
