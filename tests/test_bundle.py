"""The device side of the hypernetwork: p2p_local/bundle.py against the shipped bundle and broken copies."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from p2p_local.adapter import BaseInfo, validate_adapter, write_adapter
from p2p_local.bundle import DEFAULT_BUNDLE, Bundle, find_bundle
from p2p_local.errors import BundleError
from p2p_local.models import DEFAULT_BASE
from p2p_local.paths import repo_root

SHIPPED = repo_root() / "models" / DEFAULT_BUNDLE


@pytest.fixture(scope="module")
def base_info(base_model_path) -> BaseInfo:
    return BaseInfo.from_gguf(base_model_path, DEFAULT_BASE.sha256)


@pytest.fixture
def bundle_copy(tmp_path) -> Path:
    dest = tmp_path / "bundle"
    shutil.copytree(SHIPPED, dest)
    return dest


def inputs(b: Bundle, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, b.embedding_dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb, rng.standard_normal((n, b.feature_dim)).astype(np.float32)


def test_shipped_bundle_fits_the_default_base(p2p_home, base_info):
    b = Bundle.load()
    assert b.directory.resolve() == SHIPPED.resolve()
    b.check(base_info)  # no exception
    assert b.base_sha256 == DEFAULT_BASE.sha256 and b.base_arch == "gemma3"
    assert b.targets and b.rank > 0 and b.layers == list(range(base_info.n_layers))
    assert b.alpha / b.rank == pytest.approx(b.scale)
    from p2p_local.profile import FEATURE_DIM

    assert b.feature_dim == FEATURE_DIM  # the app's feature builder and the bundle agree
    assert (SHIPPED / "hypernet.onnx").stat().st_size <= 25 * 2**20
    assert len(b.sha256) == 64


def test_generate_gives_valid_gguf_adapters(p2p_home, base_info, tmp_path):
    b = Bundle.load(SHIPPED)
    ads = b.generate(*inputs(b, 3))
    assert len(ads) == 3
    for ad in ads:
        assert set(ad) == {f"blk.{layer}.{m}.weight" for layer in b.layers for m in b.targets}
        for name, (a, bb) in ad.items():
            n_out, n_in = base_info.shapes[name]
            assert a.shape == (b.rank, n_in) and bb.shape == (n_out, b.rank)
            assert a.dtype == bb.dtype == np.float32
    if b.neutral:  # the stand-in generates the zero adapter
        assert all(not np.any(bb) for ad in ads for _, bb in ad.values())
    path = write_adapter(tmp_path / "u.gguf", ads[0], alpha=b.alpha, base=base_info)
    adapter = validate_adapter(path, base_info)
    assert adapter.scale == pytest.approx(b.scale)
    # one row and a batch agree (dynamic batch)
    one = b.generate(*(x[:1] for x in inputs(b, 3)))[0]
    for name in one:
        np.testing.assert_allclose(one[name][0], ads[0][name][0], atol=1e-6)


def test_check_refuses_another_base_or_encoder(p2p_home, base_info):
    b = Bundle.load(SHIPPED)
    with pytest.raises(BundleError, match="sha256"):
        b.check(dataclasses.replace(base_info, sha256="0" * 64))
    with pytest.raises(BundleError, match="llama"):
        b.check(dataclasses.replace(base_info, arch="llama"))
    shapes = dict(base_info.shapes)
    shapes["blk.0.attn_q.weight"] = (2048, 640)
    with pytest.raises(BundleError, match="shape"):
        b.check(dataclasses.replace(base_info, shapes=shapes))

    class OtherEncoder:
        id, sha256 = "other/encoder", "f" * 64

    if b.encoder_sha256 and not b.neutral:
        with pytest.raises(BundleError, match="encoder"):
            b.check(base_info, OtherEncoder())
    from p2p_local import encoder

    class SameEncoder:
        id, sha256 = encoder.ENCODER_ID, encoder.SOURCE_SHA256

    b.check(base_info, SameEncoder())


def test_encoder_mismatch_refused_for_trained_bundle(bundle_copy, base_info):
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["neutral"] = False
    (bundle_copy / "manifest.json").write_text(json.dumps(m))

    class OtherEncoder:
        id, sha256 = "other/encoder", "f" * 64

    with pytest.raises(BundleError, match="encoder"):
        Bundle.load(bundle_copy).check(base_info, OtherEncoder())


def test_corrupt_onnx_is_a_bundle_error(bundle_copy):
    onnx_path = bundle_copy / "hypernet.onnx"
    data = onnx_path.read_bytes()
    onnx_path.write_bytes(data[: len(data) // 3])
    with pytest.raises(BundleError, match="does not match its manifest"):
        Bundle.load(bundle_copy)
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["onnx"]["sha256"] = None  # no hash to compare: onnxruntime itself must fail cleanly
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="not a loadable ONNX"):
        Bundle.load(bundle_copy)
    onnx_path.unlink()
    with pytest.raises(BundleError, match="missing"):
        Bundle.load(bundle_copy)


@pytest.mark.parametrize("breakage", ["not json", "array", "format", "version", "no lora", "bad rank",
                                      "no feature_dim", "dim mismatch", "missing"])
def test_bad_manifest_is_a_bundle_error(bundle_copy, breakage):
    path = bundle_copy / "manifest.json"
    m = json.loads(path.read_text())
    text = None
    if breakage == "not json":
        text = "{ this is not json"
    elif breakage == "array":
        text = "[]"
    elif breakage == "format":
        m["format"] = "something-else"
    elif breakage == "version":
        m["format_version"] = 99
    elif breakage == "no lora":
        del m["lora"]
    elif breakage == "bad rank":
        m["lora"]["rank"] = "eight"
    elif breakage == "no feature_dim":
        del m["feature_dim"]
    elif breakage == "dim mismatch":
        m["feature_dim"] += 1  # the ONNX input says otherwise
    if breakage == "missing":
        path.unlink()
    else:
        path.write_text(text if text is not None else json.dumps(m))
    with pytest.raises(BundleError):
        Bundle.load(bundle_copy)


def test_wrong_inputs_are_refused(p2p_home):
    b = Bundle.load(SHIPPED)
    emb, feats = inputs(b, 2)
    with pytest.raises(BundleError, match="expects"):
        b.generate(emb[:, :100], feats)
    with pytest.raises(BundleError, match="expects"):
        b.generate(emb, feats[:1])
    feats[0, 0] = np.nan
    with pytest.raises(BundleError, match="NaN"):
        b.generate(emb, feats)


def test_lookup_prefers_the_data_dir(p2p_home, bundle_copy):
    assert find_bundle().resolve() == SHIPPED.resolve()
    user = p2p_home / "bundles" / DEFAULT_BUNDLE
    shutil.copytree(bundle_copy, user)
    assert Bundle.load().directory == user
    assert Bundle.load(DEFAULT_BUNDLE).directory == user
    with pytest.raises(BundleError, match="not found"):
        Bundle.load("no-such-bundle")
    with pytest.raises(BundleError):
        Bundle.load(p2p_home / "nowhere" / "x")


@pytest.mark.parametrize("change", ["version", "order", "missing"])
def test_a_bundle_on_another_feature_contract_is_refused(bundle_copy, base_info, change):
    """The manifest states the feature contract it was trained on; another one is refused before use."""
    from p2p_local.profile import FEATURE_NAMES, FEATURE_VERSION

    path = bundle_copy / "manifest.json"
    m = json.loads(path.read_text())
    assert m["feature_version"] == FEATURE_VERSION and m["feature_names"] == list(FEATURE_NAMES)
    Bundle.load(bundle_copy).check_features()  # as shipped: accepted
    if change == "version":
        m["feature_version"] = FEATURE_VERSION + 1
    elif change == "order":
        m["feature_names"] = m["feature_names"][::-1]
    else:
        del m["feature_version"]
    path.write_text(json.dumps(m))
    with pytest.raises(BundleError, match="profile features") as e:
        Bundle.load(bundle_copy).check(base_info)
    assert e.value.hint
