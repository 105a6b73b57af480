"""Converter and checkpoint refusals: what --overwrite may replace, non-finite weights, bad
tokenizers, temporary directories of killed conversions, unwritable outputs, directory modes,
corrupt headers and metadata, and `~` in paths.

Each refusal is checked for its error type, for a message naming the offending tensor, file or
path, and for leaving nothing behind; those that can be refused up front are checked to be
refused before a single weight is read.
"""
import errno
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import warnings

import jax
import numpy as np
import pytest
from conftest import ROOT
from safetensors.numpy import load_file, save_file

import jllm
from jllm import hf as hf_convert
from convert.tiny import make_tiny_hf
from jllm import checkpoint
from jllm.config import LlamaConfig

SCRIPT = os.path.join(ROOT, "scripts", "convert_hf.py")
DAY_S = 24 * 3600


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> str:
    """A tiny HF directory (config.json + model.safetensors, no tokenizer)."""
    return make_tiny_hf(str(tmp_path_factory.mktemp("tiny_hf") / "hf"), tokenizer=False)


@pytest.fixture
def src(tiny_hf, tmp_path):
    """A copy of the tiny HF directory at tmp_path/hf, to damage or to protect."""
    shutil.copytree(tiny_hf, tmp_path / "hf")
    return tmp_path / "hf"


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """The weight files the converter reads (in order) during the test."""
    calls = []
    real = hf_convert._read_safetensors

    def spy(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(hf_convert, "_read_safetensors", spy)
    return calls


def convert(hf_dir, out_dir, dtype: str = "float32", **kw):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "'.*' has no tokenizer.model")
        return hf_convert.convert(hf_dir, out_dir, dtype=dtype, progress=False, **kw)


def snapshot(d) -> dict[str, bytes]:
    """Every file under d (or d itself, if a file) with its contents."""
    d = str(d)
    if os.path.isfile(d):
        return {"": open(d, "rb").read()}
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, d)] = open(p, "rb").read()
    return out


def quoted(path) -> str:
    """A regex matching the path as messages quote it (repr)."""
    return re.escape(repr(str(path)))


def edit_tensors(d, fn) -> None:
    path = os.path.join(d, "model.safetensors")
    tensors = {k: np.array(v) for k, v in load_file(path).items()}
    fn(tensors)
    save_file(tensors, path)


# --- 1. --overwrite replaces only a jllm checkpoint, never the source -----------------------------

@pytest.mark.parametrize("where", ["source", "parent_of_source"])
def test_overwrite_refuses_the_source_and_what_contains_it(src, tmp_path, reads, where):
    out = src if where == "source" else tmp_path
    before = snapshot(src)
    with pytest.raises(ValueError, match=f"{quoted(out)} is or contains the source"):
        convert(src, out, overwrite=True)
    assert snapshot(src) == before and os.listdir(tmp_path) == ["hf"]
    assert reads == []


def test_overwrite_refuses_a_checkpoint_that_holds_the_source(tiny_hf, tmp_path, reads):
    ck = tmp_path / "ck"
    convert(tiny_hf, ck)
    shutil.copytree(tiny_hf, ck / "hf")  # a checkpoint, with the source stored inside it
    before = snapshot(ck)
    reads.clear()
    with pytest.raises(ValueError, match=f"{quoted(ck)} is or contains the source"):
        convert(ck / "hf", ck, overwrite=True)
    assert snapshot(ck) == before and os.listdir(tmp_path) == ["ck"]
    assert reads == []


@pytest.mark.parametrize("kind", ["directory_of_other_files", "plain_file"])
@pytest.mark.parametrize("via", ["convert", "checkpoint.save"])
def test_overwrite_refuses_what_is_not_a_jllm_checkpoint(src, tmp_path, reads, kind, via):
    out = tmp_path / "out"
    if kind == "plain_file":
        out.write_text("notes")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("notes")
        (out / "config.json").write_text("{}")
    before = snapshot(out)
    with pytest.raises(FileExistsError, match=quoted(out)):
        if via == "convert":
            convert(src, out, overwrite=True)
        else:
            cfg = LlamaConfig.from_name("tiny")
            checkpoint.save(out, {"norm": np.ones(cfg.dim, np.float32)}, cfg, dtype="float32",
                            overwrite=True)
    assert snapshot(out) == before and sorted(os.listdir(tmp_path)) == ["hf", "out"]
    assert reads == []


def test_overwrite_replaces_a_checkpoint_only_once_the_new_one_is_complete(
        src, tmp_path, tokenizer_path, monkeypatch):
    shutil.copyfile(tokenizer_path, src / "tokenizer.model")
    ck = tmp_path / "ck"
    convert(src, ck, dtype="float32")
    before = snapshot(ck)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as m:  # fails after the new params are written
        m.setattr(checkpoint.shutil, "copyfile", fail)
        with pytest.raises(OSError, match="disk full"):
            convert(src, ck, dtype="bfloat16", overwrite=True)
    assert snapshot(ck) == before and sorted(os.listdir(tmp_path)) == ["ck", "hf"]

    convert(src, ck, dtype="bfloat16", overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["ck", "hf"]
    assert sorted(os.listdir(ck)) == [checkpoint.META, "params", "tokenizer.model"]
    assert checkpoint.read_meta(ck)[1]["dtype"] == "bfloat16"


def test_overwrite_through_a_symlink_replaces_the_checkpoint_it_points_to(tiny_hf, tmp_path):
    real, link = tmp_path / "data" / "ck", tmp_path / "ck"
    convert(tiny_hf, real)
    link.symlink_to(real)
    convert(tiny_hf, link, dtype="bfloat16", overwrite=True)
    assert link.is_symlink() and checkpoint.read_meta(real)[1]["dtype"] == "bfloat16"
    assert os.listdir(tmp_path / "data") == ["ck"]


# --- 4. non-finite weights and bad tokenizers -------------------------------------------------

@pytest.mark.parametrize("bad, dtype", [(np.nan, "float32"), (np.inf, "bfloat16"),
                                        (-np.inf, "float16"), (1e6, "float16")],
                         ids=["nan", "inf", "-inf", "overflows_float16"])
def test_non_finite_weight_is_refused_naming_the_tensor(src, tmp_path, bad, dtype):
    def damage(t):
        t["model.layers.1.mlp.down_proj.weight"][3, 5] = bad

    edit_tensors(src, damage)
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.down_proj\.weight' has 1 "
                                         r"non-finite values .* at \[3, 5\]"):
        convert(src, tmp_path / "models" / "ck", dtype=dtype)
    assert os.listdir(tmp_path) == ["hf"]  # nor the parent it created


def test_garbage_tokenizer_is_refused_at_conversion(src, tmp_path, reads):
    (src / "tokenizer.model").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match=quoted(src / "tokenizer.model")):
        convert(src, tmp_path / "ck")
    assert os.listdir(tmp_path) == ["hf"] and reads == []


def test_tokenizer_larger_than_vocab_is_refused_at_conversion(tmp_path, tokenizer_path, reads):
    hf_dir = make_tiny_hf(str(tmp_path / "hf"), LlamaConfig.from_name("tiny", vocab_size=300),
                          tokenizer=False)
    shutil.copyfile(tokenizer_path, os.path.join(hf_dir, "tokenizer.model"))
    with pytest.raises(ValueError, match=r"tokenizer\.model' has 512 pieces but the model's "
                                         r"vocab_size is 300"):
        convert(hf_dir, tmp_path / "ck")
    assert os.listdir(tmp_path) == ["hf"] and reads == []


# --- 5. temporary directories of killed conversions ----------------------------------------

# Opens a staging directory for each path given, as a conversion does before reading weights,
# prints each, and waits to be killed.
WRITER = """
import contextlib, sys, time
from jllm import checkpoint
with contextlib.ExitStack() as stack:
    for path in sys.argv[1:]:
        print(stack.enter_context(checkpoint.staging(path)), flush=True)
    time.sleep(600)
"""


def start_writer(*paths) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, *map(str, paths)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "JLLM_CACHE_DIR": "off", "JAX_PLATFORMS": "cpu"})
    return proc, [proc.stdout.readline().strip() for _ in paths]


def test_stale_temporary_directories_are_removed_and_reported(tiny_hf, tmp_path, capsys):
    parent = tmp_path / "models"
    killed, [stale] = start_writer(parent / "ck")
    alive, [busy, old] = start_writer(parent / "busy", parent / "old")
    try:
        killed.kill()
        killed.wait()
        assert os.path.basename(stale).startswith(".ck.tmp-") and os.path.isdir(stale)
        os.mkdir(os.path.join(stale, "params"))  # as if killed while writing the params
        old_marker = os.path.join(old, checkpoint.MARKER)
        os.utime(old_marker, (time.time() - 2 * DAY_S,) * 2)  # a live pid, but two days old
        foreign = parent / ".ck.tmp-notours"  # the same pattern, no marker: not ours
        foreign.mkdir()
        (foreign / "data").write_text("x")
        capsys.readouterr()
        convert(tiny_hf, parent / "ck")
        err = capsys.readouterr().err
        assert not os.path.exists(stale) and not os.path.exists(old)
        assert os.path.isdir(busy) and (foreign / "data").read_text() == "x"
        [line] = [x for x in err.splitlines() if "removed" in x]
        assert stale in line and old in line and busy not in line and str(foreign) not in line
        assert (parent / "ck" / checkpoint.META).is_file()
    finally:
        alive.kill()
        alive.wait()
        killed.stdout.close()
        alive.stdout.close()


# --- 7. the output location is checked before any weight is read ----------------------------

def test_output_under_a_file_is_refused_before_reading_weights(tiny_hf, tmp_path, reads):
    blocker = tmp_path / "somefile"
    blocker.write_text("x")
    with pytest.raises(ValueError, match=f"cannot write to {quoted(blocker / 'sub' / 'ck')}: "
                                         f"{quoted(blocker)} is not a directory"):
        convert(tiny_hf, blocker / "sub" / "ck")
    assert blocker.read_text() == "x" and reads == []


@pytest.mark.parametrize("missing_parent", [False, True])
def test_unwritable_output_is_refused_before_reading_weights(tiny_hf, tmp_path, reads,
                                                             monkeypatch, missing_parent):
    """As root every directory is writable, so the file system's refusal is simulated."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if os.path.dirname(os.fspath(path)) == str(locked):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    out = locked / "new" / "ck" if missing_parent else locked / "ck"
    where = locked / "new" if missing_parent else locked
    with pytest.raises(ValueError, match=f"cannot write to {quoted(where)}: Permission denied"):
        convert(tiny_hf, out)
    assert os.listdir(locked) == [] and reads == []


def test_script_reports_an_unusable_output_without_a_traceback(tiny_hf, tmp_path):
    blocker = tmp_path / "somefile"
    blocker.write_text("x")
    r = subprocess.run([sys.executable, SCRIPT, tiny_hf, str(blocker / "ck")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JLLM_CACHE_DIR": "off", "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"{str(blocker)!r} is not a directory" in r.stderr
    assert "converting tensors" not in r.stderr  # refused before reading weights


# --- 8. directory modes follow the umask --------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask=022", "umask=027"])
def test_checkpoint_directories_follow_the_umask(tiny_hf, tmp_path, umask):
    previous = os.umask(umask)
    try:
        convert(tiny_hf, tmp_path / "models" / "ck")
    finally:
        os.umask(previous)
    for d in (tmp_path / "models", tmp_path / "models" / "ck"):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o777 & ~umask, oct(os.stat(d).st_mode)
    meta = tmp_path / "models" / "ck" / checkpoint.META
    assert stat.S_IMODE(os.stat(meta).st_mode) == 0o666 & ~umask


# --- 12. corrupt headers, configs and metadata -----------------------------------------------

def _set_header_length(d, n: int) -> None:
    with open(os.path.join(d, "model.safetensors"), "r+b") as f:
        f.write(n.to_bytes(8, "little"))


def _list_header(d) -> None:
    header = b"[1, 2]"
    with open(os.path.join(d, "model.safetensors"), "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)


@pytest.mark.parametrize("damage, match", [
    (lambda d: _set_header_length(d, 2 ** 62), "header length field says 4611686018427387904"),
    (_list_header, "header is a JSON list; expected an object"),
], ids=["length_2**62", "header_is_a_list"])
def test_corrupt_safetensors_header_is_refused_naming_the_file(src, tmp_path, damage, match):
    damage(str(src))
    with pytest.raises(ValueError, match=f"{quoted(src / 'model.safetensors')}: its {match}"):
        convert(src, tmp_path / "ck")
    assert os.listdir(tmp_path) == ["hf"]


@pytest.mark.parametrize("content", ["[1, 2]", '"llama"', "7"], ids=["list", "string", "number"])
def test_config_json_that_is_not_an_object_is_refused(src, tmp_path, content):
    (src / "config.json").write_text(content)
    kind = type(json.loads(content)).__name__
    with pytest.raises(ValueError, match=f"{quoted(src / 'config.json')} holds a JSON {kind}; "
                                         f"expected an object"):
        convert(src, tmp_path / "ck")
    with pytest.raises(ValueError, match="expected an object"):
        LlamaConfig.from_hf(json.loads(content))
    assert os.listdir(tmp_path) == ["hf"]


def test_index_that_is_not_an_object_is_refused(src, tmp_path):
    (src / "model.safetensors.index.json").write_text('["model.safetensors"]')
    with pytest.raises(ValueError, match=quoted(src / "model.safetensors.index.json")):
        convert(src, tmp_path / "ck")
    assert os.listdir(tmp_path) == ["hf"]


def test_metadata_that_disagrees_with_the_stored_arrays_is_refused_at_load(tiny_hf, tmp_path):
    ck = tmp_path / "ck"
    convert(tiny_hf, ck)
    meta_path = ck / checkpoint.META
    meta = json.loads(meta_path.read_text())
    meta["config"]["dim"] = 128  # still a valid config (4 heads of 32)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"array 'layers\.0\.attention_norm' is stored with shape "
                                         r"\(64,\) but the config in jllm\.json needs \(128,\)"):
        jllm.load(ck, progress=False)


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(quant="int8"), r"quant='int8'; expected null or an object"),
    (lambda m: m.update(quant={"mode": "int9"}), r"quant=\{'mode': 'int9'\}: quantize='int9'"),
    (lambda m: m.update(quant={"group_size": 32}), r"quant=\{'group_size': 32\}"),
    (lambda m: m.pop("dtype"), r"dtype=None; expected bfloat16, float16 or float32"),
    (lambda m: m.update(format=2, config={**m["config"], "new_field": 1}), r"has format 2; this jllm reads 1"),
], ids=["quant_string", "quant_mode", "quant_without_mode", "no_dtype", "newer_format"])
def test_edited_metadata_is_refused_naming_the_file_and_field(tiny_hf, tmp_path, edit, match):
    ck = tmp_path / "ck"
    convert(tiny_hf, ck)
    meta = json.loads((ck / checkpoint.META).read_text())
    edit(meta)
    (ck / checkpoint.META).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=match) as e:
        jllm.load(ck, progress=False)
    assert checkpoint.META in str(e.value)


@pytest.mark.parametrize("content, match", [
    ({"rope_parameters": [1, 2]}, r"rope_parameters=\[1, 2\]; expected an object"),
    ({"rope_theta": None}, r"rope_theta=None; expected a number"),
    ({"rms_norm_eps": "1e-6"}, r"rms_norm_eps='1e-6'; expected a number"),
    ({"rope_parameters": {"rope_theta": None}}, r"rope_theta=None; expected a number"),
], ids=["rope_parameters_list", "rope_theta_null", "eps_string", "nested_theta_null"])
def test_config_fields_of_the_wrong_type_are_refused_naming_them(src, tmp_path, content, match):
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, **content}))
    with pytest.raises(ValueError, match=match):
        convert(src, tmp_path / "ck")
    assert os.listdir(tmp_path) == ["hf"]


@pytest.mark.parametrize("state", ["wrapped", "list"])
def test_a_pytorch_file_that_is_not_a_flat_state_dict_is_refused(src, tmp_path, state):
    torch = pytest.importorskip("torch")
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in load_file(src / "model.safetensors").items()}
    os.remove(src / "model.safetensors")
    torch.save({"state_dict": tensors, "step": 5} if state == "wrapped" else list(tensors.values()),
               src / "pytorch_model.bin")
    with pytest.raises(ValueError, match=quoted(src / "pytorch_model.bin")):
        convert(src, tmp_path / "ck")
    assert os.listdir(tmp_path) == ["hf"]


def test_a_stored_int4_checkpoint_refuses_another_group_size(tmp_path):
    hf = make_tiny_hf(str(tmp_path / "hf"), LlamaConfig.from_name("tiny", ffn_dim=192), tokenizer=False)
    ck = tmp_path / "ck"
    convert(hf, ck, quantize="int4", group_size=32)
    with pytest.raises(ValueError, match="groups of 32; cannot load it with group_size=64"):
        jllm.load(ck, quantize="int4", group_size=64, progress=False)
    assert jllm.load(ck, quantize="int4", group_size=32, progress=False).quant == "int4"


def test_a_stored_int4_checkpoint_on_a_mesh_is_sharded_for_its_own_group_size(tmp_path, monkeypatch):
    """jllm.load(mesh=...) lays out the stored scales: [K / 32, N] here, not the default groups'
    [K / 128, N] (on tp > 1 those could be told to split rows they do not have)."""
    from jllm import parallel
    from sharding.rules import make_mesh
    hf = make_tiny_hf(str(tmp_path / "hf"), LlamaConfig.from_name("tiny", ffn_dim=192), tokenizer=False)
    convert(hf, tmp_path / "ck", quantize="int4", group_size=32)
    seen, real = [], parallel.param_shardings
    monkeypatch.setattr(parallel, "param_shardings", lambda *a, **k: seen.append(k) or real(*a, **k))
    model = jllm.load(tmp_path / "ck", mesh=make_mesh(1), progress=False)
    assert seen and all(k.get("group_size") == 32 for k in seen)
    assert model.params.layers[0].w2.scale.shape == (192 // 32, 64)


def test_a_full_disk_while_writing_is_a_one_line_cli_error(tiny_hf, tokenizer_path, tmp_path, monkeypatch, capsys):
    """OSError (here ENOSPC from the tokenizer copy) ends `jllm convert` with a message and exit 2;
    nothing is left behind."""
    from jllm import cli
    hf = tmp_path / "hf"
    shutil.copytree(tiny_hf, hf)
    shutil.copy(tokenizer_path, hf / "tokenizer.model")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out"))
    monkeypatch.setattr(checkpoint.shutil, "copyfile", full)
    assert cli.main(["convert", str(hf), str(tmp_path / "out"), "--dtype", "float32"]) == 2
    err = capsys.readouterr().err
    assert "jllm convert: error:" in err and "No space left on device" in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["hf"]


# --- 6. `~` in paths -----------------------------------------------------------------------------

def test_tilde_in_paths_means_home(tiny_hf, tmp_path, monkeypatch):
    home = tmp_path / "home"
    shutil.copytree(tiny_hf, home / "hf")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    cfg = convert("~/hf", "~/models/ck")
    assert (home / "models" / "ck" / checkpoint.META).is_file()
    assert sorted(os.listdir(tmp_path)) == ["home"]  # no directory named "~"
    assert checkpoint.read_meta("~/models/ck")[0] == cfg
    with pytest.warns(UserWarning, match="no tokenizer.model"):
        _, want, _ = hf_convert.load_hf("~/hf", "float32", progress=False)
    target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in want.items()}
    got = checkpoint.restore("~/models/ck", target)
    for name, w in want.items():
        np.testing.assert_array_equal(np.asarray(got[name]), w, err_msg=name)
