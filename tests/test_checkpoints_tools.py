"""HF <-> Orbax conversion, sharded restore and parity against transformers (tiny random Qwen3s)."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from checkpoints_tools import hf_to_orbax, orbax_to_hf  # noqa: E402
from tau2jax.weights import hf_read, hf_write, mapping, orbax_params  # noqa: E402
from tau2jax.weights.convert import convert  # noqa: E402
from tau2jax.weights.hf_read import ConversionError  # noqa: E402
from tau2jax.models.tiny_hf import make_tiny_hf_dir  # noqa: E402
from tau2jax.models import qwen3  # noqa: E402
from tau2jax.parallel import sharding  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {
        "tied": make_tiny_hf_dir(str(root / "tied"), tied=True, seed=0),
        # several shards + model.safetensors.index.json
        "untied_sharded": make_tiny_hf_dir(str(root / "untied"), tied=False, seed=1,
                                           max_shard_size="40KB"),
        "bf16": make_tiny_hf_dir(str(root / "bf16"), tied=True, seed=2, dtype="bfloat16"),
    }


@pytest.fixture(scope="module")
def tied_orbax(hf_dirs, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("orbax") / "tied")
    convert(hf_dirs["tied"], out)
    return out


def _read_all(hf_dir):
    out = {}
    for name in sorted(os.listdir(hf_dir)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(hf_dir, name), framework="np") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.parametrize("case,export_dtype", [("tied", None), ("untied_sharded", None),
                                               ("bf16", "bfloat16")])
def test_hf_orbax_hf_round_trip_is_bit_identical(hf_dirs, tmp_path, case, export_dtype):
    src = hf_dirs[case]
    if case == "untied_sharded":
        assert os.path.isfile(os.path.join(src, hf_read.INDEX_FILE))
    orbax_dir, back = str(tmp_path / "orbax"), str(tmp_path / "back")
    convert(src, orbax_dir)  # float32 storage; bf16 -> f32 -> bf16 is exact
    argv = ["--orbax-dir", orbax_dir, "--out", back, "--max-shard-size", "50KB"]
    assert orbax_to_hf.main(argv + (["--dtype", export_dtype] if export_dtype else [])) == 0

    a, b = _read_all(src), _read_all(back)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert np.array_equal(a[name], b[name]), name
    with open(os.path.join(back, hf_read.INDEX_FILE)) as f:
        assert set(json.load(f)["weight_map"]) == set(a)
    assert len([n for n in os.listdir(back) if n.endswith(".safetensors")]) > 1
    # issue 16.6: a server running as another user must be able to read the export
    assert os.stat(back).st_mode & 0o777 == 0o755
    for n in os.listdir(back):
        assert os.stat(os.path.join(back, n)).st_mode & 0o777 == 0o644, n

    import torch
    tokens = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = transformers.AutoModelForCausalLM.from_pretrained(src)(tokens).logits
        got = transformers.AutoModelForCausalLM.from_pretrained(back)(tokens).logits
    assert torch.equal(ref, got)


def test_parity_random_tiny_cli():
    cmd = [sys.executable, "-m", "checkpoints_tools.parity", "--random-tiny", "--tokens", "16"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["max_abs_logit_diff"] <= 1e-4, result
    assert result["greedy_match"] == 1.0, result
    assert result["dtype"] == "float32" and result["num_tokens"] == 32
    assert result["max_abs_logit"] > 0.5  # logits are O(1): the comparison is not vacuous


def test_parity_against_the_wrong_weights_exits_1_naming_the_metrics(hf_dirs, tmp_path, capsys):
    """Issue 33: parity once reported greedy match 0.09 with rc 0; now outside its tolerances it is
    rc 1 with one stderr line naming each metric and its tolerance."""
    from checkpoints_tools import parity

    wrong = str(tmp_path / "wrong")
    hf_to_orbax.convert(make_tiny_hf_dir(str(tmp_path / "other"), tied=True, seed=5), wrong)
    capsys.readouterr()  # transformers' progress bars
    rc = parity.main(["--hf-dir", hf_dirs["tied"], "--orbax-dir", wrong, "--tokens", "16"])
    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])
    assert rc == 1 and result["ok"] is False and result["greedy_match"] < 0.5, result
    [line] = [ln for ln in err.splitlines() if "error" in ln.lower()]  # besides transformers' progress bars
    assert line.startswith("error: parity fails: max_abs_logit_diff ") and "above the tolerance 0.0001" in line
    assert f"greedy_match {result['greedy_match']:.4f} is below the tolerance 1" in line
    # the right weights pass with the same defaults; looser tolerances are flags
    assert parity.main(["--hf-dir", hf_dirs["tied"], "--orbax-dir", wrong, "--tokens", "16",
                        "--max-diff", "1e9", "--min-greedy-match", "0"]) == 0
    capsys.readouterr()
    assert parity.main(["--hf-dir", hf_dirs["tied"], "--tokens", "16"]) == 0  # converts it afresh
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ok"] is True


def test_hf_to_orbax_output_is_0755_as_every_export(tied_orbax):
    """Issue 33: mkdtemp made the converted dir 0700, unreadable to a server of another user."""
    assert os.stat(tied_orbax).st_mode & 0o777 == 0o755
    for d, _, files in os.walk(tied_orbax):
        assert os.stat(d).st_mode & 0o777 == 0o755, d
        for f in files:
            assert os.stat(os.path.join(d, f)).st_mode & 0o777 == 0o644, f


def test_restore_sharded_matches_single_device(tied_orbax):
    assert len(jax.devices()) >= 8, "conftest should provide 8 fake CPU devices"
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2, devices=jax.devices()[:8])
    params_1, cfg = orbax_params.restore_params(tied_orbax)
    params_8, cfg8 = orbax_params.restore_params(tied_orbax, mesh=mesh)
    assert cfg8 == cfg

    want = qwen3.param_shardings(cfg, mesh)
    for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(params_8), jax.tree.leaves(want)):
        assert x.sharding.is_equivalent_to(s, x.ndim), jax.tree_util.keystr(path)
    q = params_8["layers"]["q_proj"]  # [L, D, H, Dh]: embed over fsdp, heads over tensor
    L, D, H, Dh = q.shape
    assert len(q.sharding.device_set) == 8
    assert {sh.data.shape for sh in q.addressable_shards} == {(L, D // 2, H // 2, Dh)}
    assert {sh.data.shape for sh in params_8["embed"].addressable_shards} == {
        (cfg.vocab_size // 2, cfg.hidden_size // 2)}

    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 16), dtype=np.int32)
    pos = np.broadcast_to(np.arange(16, dtype=np.int32), tokens.shape)
    seg = np.ones_like(tokens)
    fwd = jax.jit(lambda p, t, ps, sg: qwen3.forward(p, cfg, t, ps, sg))
    ref = fwd(params_1, tokens, pos, seg)
    with jax.set_mesh(mesh):
        batch = sharding.batch_sharding(mesh)
        got = fwd(params_8, *(jax.device_put(a, batch) for a in (tokens, pos, seg)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=1e-5)


def test_restore_errors(tmp_path, tied_orbax):
    with pytest.raises(orbax_params.CheckpointFormatError, match="does not exist"):
        orbax_params.restore_params(str(tmp_path / "nope"))
    with pytest.raises(orbax_params.CheckpointFormatError, match="not a converted checkpoint"):
        orbax_params.restore_params(str(tmp_path))
    bad = tmp_path / "bad"
    shutil.copytree(tied_orbax, bad)
    with open(bad / orbax_params.CONFIG_FILE) as f:
        fields = json.load(f)
    with open(bad / orbax_params.CONFIG_FILE, "w") as f:
        json.dump({**fields, "num_layers": 3}, f)
    with pytest.raises(orbax_params.CheckpointFormatError, match=r"layers/.* has shape"):
        orbax_params.restore_params(str(bad))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _rewrite(path, fn):
    """Rewrites one safetensors file with fn(dict of tensors) applied."""
    with safe_open(path, framework="np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(fn(tensors), path, metadata={"format": "pt"})


def _edit_config(hf_dir, **changes):
    path = os.path.join(hf_dir, "config.json")
    with open(path) as f:
        hf = json.load(f)
    with open(path, "w") as f:
        json.dump({**hf, **changes}, f)


def _break(kind, src, tmp_path):
    """Makes a broken copy of `src`; returns (hf_dir, regex the error must match)."""
    if kind == "missing_dir":
        return str(tmp_path / "absent"), "absent does not exist"
    d = _copy(src, tmp_path / "hf")
    weights = os.path.join(d, "model.safetensors")
    if kind == "missing_config":
        os.remove(os.path.join(d, "config.json"))
        return d, r"config\.json not found"
    if kind == "no_safetensors":
        os.remove(weights)
        return d, r"no \*\.safetensors files in"
    if kind == "shape_mismatch":
        _edit_config(d, intermediate_size=96)
        return d, (r"tensor model\.layers\.0\.mlp\.\w+_proj\.weight in .*model\.safetensors "
                   r"has shape \(\d+, \d+\), config\.json implies")
    if kind == "unknown_tensor":
        save_file({"model.layers.0.mlp.gate_proj.bias": np.zeros(128, np.float32)},
                  os.path.join(d, "extra.safetensors"))
        return d, r"unknown tensor model\.layers\.0\.mlp\.gate_proj\.bias in .*extra\.safetensors"
    if kind == "missing_tensor":
        _rewrite(weights, lambda t: {k: v for k, v in t.items()
                                     if k != "model.layers.1.self_attn.k_norm.weight"})
        return d, r"tensor model\.layers\.1\.self_attn\.k_norm\.weight is missing"
    if kind == "tied_head_differs":
        _rewrite(weights, lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"] + 1})
        return d, r"tie_word_embeddings=true but lm_head\.weight in .*model\.safetensors differs"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing_dir", "missing_config", "no_safetensors",
                                  "shape_mismatch", "unknown_tensor", "missing_tensor",
                                  "tied_head_differs"])
def test_bad_input_names_the_problem_and_leaves_no_output(hf_dirs, tmp_path, kind):
    hf_dir, pattern = _break(kind, hf_dirs["tied"], tmp_path)
    out = tmp_path / "out" / "ckpt"
    with pytest.raises(ConversionError, match=pattern):
        convert(hf_dir, str(out))
    assert not out.exists()
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_cli_reports_peak_memory(hf_dirs, tmp_path, capsys):
    assert hf_to_orbax.main(["--hf-dir", hf_dirs["tied"], "--out", str(tmp_path / "o")]) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["peak_rss_mb"] >= stats["rss_before_mb"] > 0 and stats["param_mb"] > 0
    assert sorted(os.listdir(tmp_path / "o")) == ["hf_extra", "model_config.json", "params"]


def test_cli_error_exit_code(tmp_path, capsys):
    assert hf_to_orbax.main(["--hf-dir", str(tmp_path / "absent"), "--out", str(tmp_path / "o")]) == 2
    assert "absent does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_tied_lm_head_equal_to_embed_is_accepted(hf_dirs, tmp_path):
    d = _copy(hf_dirs["tied"], tmp_path / "hf")
    _rewrite(os.path.join(d, "model.safetensors"),
             lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"]})
    convert(d, str(tmp_path / "out"))
    params, cfg = orbax_params.restore_params(str(tmp_path / "out"))
    assert cfg.tie_word_embeddings and "lm_head" not in params


def test_failed_write_leaves_nothing(hf_dirs, tmp_path, monkeypatch):
    def fail(out_dir, params, cfg):
        open(os.path.join(out_dir, "partial"), "w").close()
        raise OSError("disk full")
    monkeypatch.setattr(orbax_params, "save_params", fail)
    with pytest.raises(OSError, match="disk full"):
        convert(hf_dirs["tied"], str(tmp_path / "out" / "ckpt"))
    assert os.listdir(tmp_path / "out") == []


def test_export_refuses_then_replaces_existing(tied_orbax, tmp_path):
    params, cfg = orbax_params.restore_params(tied_orbax)
    out = tmp_path / "hf"
    hf_write.export_hf(params, cfg, str(out), dtype="bfloat16")
    with pytest.raises(FileExistsError):
        hf_write.export_hf(params, cfg, str(out))
    hf_write.export_hf(params, cfg, str(out), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["hf"]
    with open(out / "config.json") as f:
        assert json.load(f)["dtype"] == "float32"


def test_mapping_hooks_invert():
    rng = np.random.default_rng(0)
    cfg = type("Cfg", (), dict(vocab_size=11, hidden_size=6, intermediate_size=10, num_heads=4,
                               num_kv_heads=2, head_dim=3, num_layers=2, tie_word_embeddings=False))
    for row in mapping.rows(cfg):
        w = rng.standard_normal(mapping.hf_shape(row, cfg))
        ours = row.hook.to_ours(w, mapping.layer_shape(row, cfg))
        assert ours.shape == mapping.layer_shape(row, cfg), row.hf
        assert np.array_equal(row.hook.to_hf(ours), w), row.hf
    # q_proj: output features are head-major, [H*Dh, D] -> [D, H, Dh]
    q = mapping.QWEN3[2]
    w = np.arange(12 * 6).reshape(12, 6)
    assert q.hook.to_ours(w, (6, 4, 3))[5, 2, 1] == w[2 * 3 + 1, 5]


def test_param_shapes_match_model(hf_dirs):
    cfg = hf_read.read_config(hf_dirs["untied_sharded"])
    shapes = jax.eval_shape(lambda: qwen3.init_params(cfg, jax.random.key(0), dtype=jnp.float32))
    assert jax.tree.map(lambda s: tuple(s.shape), shapes) == mapping.param_shapes(cfg)


def _truncate_largest(directory):
    files = [os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs]
    big = max(files, key=os.path.getsize)
    os.truncate(big, os.path.getsize(big) // 2)
    return big


def _cli(module, *args):
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=os.path.dirname(os.path.dirname(__file__)),
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


def test_conversion_clis_answer_damaged_weights_in_one_line_and_write_nothing(hf_dirs, tied_orbax, tmp_path):
    """A truncated safetensors file was a 20-line safetensors traceback (rc 1); a truncated Orbax
    array a TensorStore spec dump. Each is one `error:` line naming the file, exit 2, no output."""
    hf_bad, orbax_bad = tmp_path / "hf_bad", tmp_path / "orbax_bad"
    shutil.copytree(hf_dirs["tied"], hf_bad)
    shutil.copytree(tied_orbax, orbax_bad)
    shard = _truncate_largest(hf_bad)
    line = _cli("checkpoints_tools.hf_to_orbax", "--hf-dir", str(hf_bad), "--out", str(tmp_path / "o"))
    assert line.startswith(f"error: {shard}: not a readable safetensors file (") and line.endswith("export it again")
    _truncate_largest(orbax_bad / "params")
    for module, args in (("checkpoints_tools.orbax_to_hf", ["--orbax-dir", str(orbax_bad), "--out", str(tmp_path / "h")]),
                         ("checkpoints_tools.parity", ["--hf-dir", hf_dirs["tied"], "--orbax-dir", str(orbax_bad)])):
        line = _cli(module, *args)
        assert line.startswith(f"error: {orbax_bad / 'params'}: reading the weights failed (") and "TensorStore({" not in line
        assert line.endswith("re-convert the weights or use another checkpoint")
    assert not (tmp_path / "o").exists() and not (tmp_path / "h").exists()
