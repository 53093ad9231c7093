"""The native-kernel cache is trusted only when it is ours; a library that does
not load is rebuilt once; the compiler has a timeout. No real kernel build:
the compiler is replaced by one that writes a tiny valid (or a broken) library."""

import ctypes
import os
import subprocess

import pytest

from diffusion_jax.ops import native


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv(native.CACHE_ENV_VAR, str(d))
    monkeypatch.setattr(native, "_TARGETS", {})  # nothing to register from the stand-in library
    monkeypatch.setattr(native, "_find_onednn", lambda: (tmp_path, tmp_path))
    return d


@pytest.fixture(scope="module")
def tiny_so(tmp_path_factory):
    d = tmp_path_factory.mktemp("so")
    (d / "tiny.c").write_text("int dj_tiny(void) { return 7; }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", str(d / "tiny.c"), "-o", str(d / "tiny.so")], check=True)
    return (d / "tiny.so").read_bytes()


def fake_compiler(monkeypatch, payloads):
    calls = []

    def compile_(cmd, out):
        calls.append(out)
        with open(out, "wb") as f:
            f.write(payloads[min(len(calls), len(payloads)) - 1])
    monkeypatch.setattr(native, "_compile", compile_)
    return calls


def test_cache_folder_is_created_private(cache, monkeypatch, tiny_so):
    calls = fake_compiler(monkeypatch, [tiny_so])
    assert native._load.__wrapped__() is None and len(calls) == 1
    assert oct(os.stat(cache).st_mode & 0o777) == "0o700"
    (lib,) = cache.glob("cpu_kernels-*.so")
    assert ctypes.CDLL(str(lib)).dj_tiny() == 7
    assert native._load.__wrapped__() is None and len(calls) == 1  # cached: not built again


def test_group_writable_cache_folder_is_refused(cache, monkeypatch, tiny_so, caplog):
    calls = fake_compiler(monkeypatch, [tiny_so])
    cache.mkdir(mode=0o700)
    os.chmod(cache, 0o777)
    reason = native._load.__wrapped__()
    assert reason.startswith("UnsafeCacheError: native-kernel cache") and "writable by group or others" in reason
    assert calls == [] and not list(cache.iterdir())
    assert any("pure-XLA" in r.getMessage() for r in caplog.records)


def test_planted_library_of_another_user_is_refused(cache, monkeypatch, tiny_so):
    calls = fake_compiler(monkeypatch, [tiny_so])
    assert native._load.__wrapped__() is None
    (lib,) = cache.glob("cpu_kernels-*.so")
    if os.getuid() == 0:
        os.chown(lib, 65534, 65534)  # planted by "nobody"
        assert "is owned by uid 65534" in native._load.__wrapped__()
        os.chown(lib, 0, 0)
    os.chmod(lib, 0o777)  # or made writable by others
    assert "writable by group or others" in native._load.__wrapped__()
    assert len(calls) == 1


def test_truncated_library_is_rebuilt_once(cache, monkeypatch, tiny_so):
    # (a path dlopen has loaded once is not read again in this process: build without loading)
    calls = fake_compiler(monkeypatch, [tiny_so])
    lib = native._build()
    lib.write_bytes(tiny_so[:100])  # truncated
    assert native._load.__wrapped__() is None and len(calls) == 2
    assert ctypes.CDLL(str(lib)).dj_tiny() == 7


def test_library_that_stays_broken_is_rebuilt_only_once(cache, monkeypatch, tiny_so):
    calls = fake_compiler(monkeypatch, [tiny_so[:100]])  # a compiler that produces junk
    native._build().write_bytes(tiny_so[:100])
    calls.clear()
    assert native._load.__wrapped__().startswith("OSError") and len(calls) == 1


def test_compiler_timeout(monkeypatch, tmp_path):
    monkeypatch.setenv(native.COMPILE_TIMEOUT_ENV_VAR, "0.5")
    with pytest.raises(RuntimeError, match=r"took over 0.5 s"):
        native._compile(["sh", "-c", "sleep 5"], str(tmp_path / "x.so"))


def test_truncated_or_altered_cached_library_is_rebuilt_before_any_load(tmp_path, tiny_so):
    """Issue #21: a cached library cut to its first 4,096 bytes killed the process inside the
    loader (SIGBUS, exit 135). Its SHA-256, recorded beside it when it was written, no longer
    matches, so it is rebuilt without being loaded; likewise when the record is damaged or
    missing. In fresh processes (tests/programs/native_cache_load.py)."""
    import hashlib
    import sys

    program = os.path.join(os.path.dirname(os.path.abspath(__file__)), "programs", "native_cache_load.py")
    (tmp_path / "tiny.so").write_bytes(tiny_so)
    env = dict(os.environ, **{native.CACHE_ENV_VAR: str(tmp_path / "cache"), "DIFFUSION_JAX_NATIVE": "1"})

    def load():
        done = subprocess.run([sys.executable, program, str(tmp_path / "tiny.so"), str(tmp_path)],
                              capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, (done.returncode, done.stderr[-2000:])  # -7: SIGBUS
        return done.stdout

    assert "available=True builds=1" in load()
    (lib,) = (tmp_path / "cache").glob("cpu_kernels-*.so")
    record = lib.with_name(lib.name + ".sha256")
    assert record.read_text().strip() == hashlib.sha256(tiny_so).hexdigest()
    assert "available=True builds=0" in load()  # verified: not built again
    for damage in (lambda: os.truncate(lib, 4096), lambda: record.write_text("0" * 64),
                   lambda: record.unlink()):
        damage()
        assert "available=True builds=1" in load()
        assert lib.read_bytes() == tiny_so and record.read_text().strip() == hashlib.sha256(tiny_so).hexdigest()
    assert sorted(p.name for p in lib.parent.iterdir()) == [lib.name, record.name]  # no temporary files left
