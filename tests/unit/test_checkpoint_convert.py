"""Hugging Face import/export and re-sharding (tools/checkpoint_convert.py) against `transformers`.

Tiny random LLaMA, Mistral and Qwen2 (tied embeddings, q/k/v bias) models are built locally;
our logits must equal transformers' within 1e-4 in fp32 (dense), and with Top-K on our output must
equal the HF model run with pre-hooks that sparsify every projection input (a reference written in
tests/hf_models.py). Export -> transformers load, and TP 2 -> 1 re-sharding, keep the logits.
"""

from __future__ import annotations

import dataclasses
import json
import os
import weakref

import pytest
import torch

from megatron_qsparse.checkpoint import load_model, read_checkpoint
from megatron_qsparse.config import Config, ConfigError
from megatron_qsparse.convert import hf
from megatron_qsparse.convert.layout import vocab_divisor, write_checkpoint
from tests.hf_models import VOCAB, build_hf_model, converter, hf_class, sparsified

TOL = dict(rtol=0, atol=1e-4)
ARCH_NAMES = ["llama", "mistral", "qwen2"]


@pytest.fixture(scope="module")
def tool():
    return converter()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {a: (build_hf_model(a, str(root / a), seed=i), str(root / a))
            for i, a in enumerate(ARCH_NAMES)}


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(7))


def _ours(path):
    model, cfg = load_model(path)
    return model, cfg


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_import_tp1_matches_transformers(tool, models, tokens, tmp_path, arch):
    ref, hf_dir = models[arch]
    assert tool.main(["import-hf", "--hf-dir", hf_dir, "--save", str(tmp_path / "ck")]) == 0
    ours, cfg = _ours(str(tmp_path / "ck"))
    assert cfg.model.add_qkv_bias == (arch == "qwen2")
    assert cfg.model.untie_embeddings_and_output_weights == (arch != "qwen2")
    assert cfg.qsparse.mode == "none"
    with torch.no_grad():
        want = ref(tokens).logits
        got = ours(tokens)
    assert got.shape[-1] == VOCAB  # no padding rows needed for this vocabulary
    torch.testing.assert_close(got, want, **TOL)
    # the converted folder is a complete checkpoint with a --config file of its shape
    assert (tmp_path / "ck" / "latest").read_text() == "iter_0000000"
    assert "ffn-type: swiglu" in (tmp_path / "ck" / "model_args.yaml").read_text()

    # export -> transformers loads it -> the same logits; the sparsity settings are recorded
    out = tmp_path / "hf_out"
    assert tool.main(["export-hf", "--load", str(tmp_path / "ck"), "--save", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == arch and config["qsparse"]["mode"] == "none"
    back = hf_class(arch).from_pretrained(str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(tokens).logits, want, **TOL)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_import_with_topk_matches_reference_sparsified_forward(tool, models, tokens, tmp_path,
                                                              arch):
    ref, hf_dir = models[arch]
    ratio = 0.4
    assert tool.main(["import-hf", "--hf-dir", hf_dir, "--save", str(tmp_path / "ck"),
                      "--qsparse-mode", "topk", "--qsparse-ratio", str(ratio)]) == 0
    ours, cfg = _ours(str(tmp_path / "ck"))
    assert cfg.qsparse.mode == "topk" and cfg.qsparse.ratio == ratio
    with torch.no_grad(), sparsified(ref, ratio):
        want = ref(tokens).logits
    with torch.no_grad():
        dense = ref(tokens).logits
        got = ours(tokens)
    assert (want - dense).abs().max() > 1e-2  # the sparsity really changes the output
    torch.testing.assert_close(got, want, **TOL)

    # the exported config records the sparsity; importing it back restores it
    out = tmp_path / "hf_out"
    assert tool.main(["export-hf", "--load", str(tmp_path / "ck"), "--save", str(out)]) == 0
    rec = json.loads((out / "config.json").read_text())["qsparse"]
    assert rec["mode"] == "topk" and rec["ratio"] == ratio
    assert tool.main(["import-hf", "--hf-dir", str(out), "--save", str(tmp_path / "ck2")]) == 0
    again, cfg2 = _ours(str(tmp_path / "ck2"))
    assert cfg2.qsparse.mode == "topk" and cfg2.qsparse.ratio == ratio
    with torch.no_grad():
        torch.testing.assert_close(again(tokens), want, **TOL)


def test_import_tp2_then_reshard_to_tp1(tool, models, tokens, tmp_path):
    ref, hf_dir = models["mistral"]
    assert tool.main(["import-hf", "--hf-dir", hf_dir, "--save", str(tmp_path / "tp2"),
                      "--target-tensor-parallel-size", "2"]) == 0
    folder = tmp_path / "tp2" / "iter_0000000"
    assert sorted(p.name for p in folder.glob("mp_rank_*")) == [
        "mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"]
    meta = json.loads((folder / "qsparse_meta.json").read_text())
    assert meta["tensor_model_parallel_size"] == 2
    shard = torch.load(folder / "mp_rank_01_model_states.pt", weights_only=True)["module"]
    assert shard["layers.0.mlp.gate_up.weight"].shape == (96, 64)  # [gate/2; up/2]
    assert shard["embedding.weight"].shape == (VOCAB // 2, 64)
    with pytest.raises(ConfigError, match="split for tensor"):
        load_model(str(tmp_path / "tp2"))

    assert tool.main(["reshard", "--load", str(tmp_path / "tp2"), "--save", str(tmp_path / "tp1"),
                      "--target-tensor-parallel-size", "1"]) == 0
    ours, _ = _ours(str(tmp_path / "tp1"))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), ref(tokens).logits, **TOL)


def test_import_tp2_pp2_then_reshard_to_one_shard(tool, models, tokens, tmp_path):
    """Any TP x PP layout: DeepSpeed's per-layer pipeline files (one per TP rank) plus one
    engine file per model-parallel rank; re-sharding back to TP = PP = 1 gives the same logits,
    and PP = 2 at TP = 1 reads back directly."""
    ref, hf_dir = models["llama"]
    assert tool.main(["import-hf", "--hf-dir", hf_dir, "--save", str(tmp_path / "tp2pp2"),
                      "--target-tensor-parallel-size", "2",
                      "--target-pipeline-model-parallel-size", "2"]) == 0
    folder = tmp_path / "tp2pp2" / "iter_0000000"
    names = sorted(p.name for p in folder.iterdir())
    # embedding, 2 blocks, final norm, untied head (llama) = layers 0..4, TP ranks 00 and 01
    assert [n for n in names if n.startswith("layer_")] == [
        f"layer_{i:02d}-model_{r:02d}-model_states.pt" for i in range(5) for r in range(2)]
    assert [n for n in names if n.startswith("mp_rank_")] == [
        f"mp_rank_{r:02d}_model_states.pt" for r in range(4)]
    block = torch.load(folder / "layer_02-model_01-model_states.pt", weights_only=True)
    assert block["mlp.gate_up.weight"].shape == (96, 64)  # layers.1, TP rank 1's [gate; up]
    meta = json.loads((folder / "qsparse_meta.json").read_text())
    assert (meta["tensor_model_parallel_size"], meta["pipeline_model_parallel_size"]) == (2, 2)

    assert tool.main(["reshard", "--load", str(tmp_path / "tp2pp2"), "--save",
                      str(tmp_path / "pp2"), "--target-pipeline-model-parallel-size", "2"]) == 0
    assert tool.main(["reshard", "--load", str(tmp_path / "pp2"), "--save",
                      str(tmp_path / "one")]) == 0
    want = ref(tokens).logits.detach()
    for ck in ("pp2", "one"):  # load_model merges a pipeline checkpoint at TP = 1
        ours, _ = _ours(str(tmp_path / ck))
        with torch.no_grad():
            torch.testing.assert_close(ours(tokens), want, **TOL)


def test_model_args_yaml_round_trips_through_the_cli(tmp_path):
    """The --config file written next to a converted checkpoint parses back to the same model
    (every field's flag spelling, switches that turn a default off included)."""
    from megatron_qsparse.arguments import parse
    from megatron_qsparse.convert.layout import model_args_yaml

    cfg = Config()
    cfg.model.num_layers, cfg.model.add_qkv_bias, cfg.model.ffn_type = 3, True, "swiglu"
    for f in dataclasses.fields(cfg.model):  # flip every switch away from its default
        if isinstance(getattr(cfg.model, f.name), bool) and f.name != "add_qkv_bias":
            setattr(cfg.model, f.name, not getattr(cfg.model, f.name))
    cfg.model.recompute_activations = False  # conflicts with granularity otherwise
    path = tmp_path / "model_args.yaml"
    path.write_text(model_args_yaml(cfg))
    back = parse(["--config", str(path), "--data-path", "d", "--tokenizer-type", "ByteTokenizer"])
    assert back.model == cfg.model


def test_reshard_repads_vocabulary(tmp_path):
    """A vocabulary that TP = 3 does not divide gets zero padding rows; going back strips them."""
    from megatron_qsparse.config import ModelConfig, QSparseConfig
    from megatron_qsparse.model.gpt import GPTModel

    tool = converter()
    cfg = Config()
    cfg.model = ModelConfig(num_layers=1, hidden_size=48, num_attention_heads=3,
                            ffn_hidden_size=96, vocab_size=100, make_vocab_size_divisible_by=4,
                            untie_embeddings_and_output_weights=True, seq_length=16)
    cfg.qsparse = QSparseConfig(mode="none")
    torch.manual_seed(0)
    model = GPTModel(cfg.model, 100).eval()
    sd = model.state_dict()
    write_checkpoint(str(tmp_path / "a"), cfg, lambda: iter(sd.items()))
    assert tool.main(["reshard", "--load", str(tmp_path / "a"), "--save", str(tmp_path / "b"),
                      "--target-tensor-parallel-size", "3"]) == 0
    cfg_b, _, src = read_checkpoint(str(tmp_path / "b"))
    full = dict(src())
    assert full["embedding.weight"].shape[0] % 3 == 0 and full["embedding.weight"].shape[0] > 100
    assert torch.equal(full["embedding.weight"][:100], sd["embedding.weight"])
    assert not full["embedding.weight"][100:].any()
    assert tool.main(["reshard", "--load", str(tmp_path / "b"), "--save", str(tmp_path / "c"),
                      "--target-tensor-parallel-size", "1"]) == 0
    back, _ = load_model(str(tmp_path / "c"))
    tok = torch.randint(0, 100, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(back(tok)[..., :100], model(tok), rtol=0, atol=1e-6)


def test_writer_holds_one_source_tensor_at_a_time(tmp_path, models):
    """Peak memory: the writer keeps no reference to a yielded full tensor once it has cut its
    shard (so a 7B import holds one shard + one tensor), and the HF reader reads lazily."""
    _, hf_dir = models["llama"]
    m = hf.model_config_from_hf(hf.read_hf_config(hf_dir))
    inner = hf.hf_source(hf_dir, m, VOCAB)
    alive, peak, reads = [0], [0], []

    def source():
        for name, t in inner():
            reads.append(name)
            alive[0] += 1
            peak[0] = max(peak[0], alive[0])
            weakref.finalize(t, lambda: alive.__setitem__(0, alive[0] - 1))
            yield name, t
            del t

    cfg = Config()
    cfg.model = m
    cfg.model.make_vocab_size_divisible_by = vocab_divisor(VOCAB, 2)
    cfg.parallel.tensor_model_parallel_size = 2
    write_checkpoint(str(tmp_path / "ck"), cfg, source)
    assert peak[0] == 1, peak
    assert len(reads) == 2 * len(hf.name_map(m))  # one pass over the source per TP rank


def test_rejections(tool, models, tmp_path, capsys):
    _, hf_dir = models["llama"]
    assert tool.main(["import-hf", "--hf-dir", hf_dir, "--save", str(tmp_path / "x"),
                      "--target-pipeline-model-parallel-size", "5"]) == 2  # 2 blocks
    assert "--pipeline-model-parallel-size: 5 stages for 2 transformer blocks" in \
        capsys.readouterr().err
    assert tool.main(["import-hf", "--hf-dir", str(tmp_path), "--save", str(tmp_path / "y")]) == 2
    assert "config.json" in capsys.readouterr().err
    conf = hf.read_hf_config(hf_dir)
    with pytest.raises(ConfigError, match="RoPE scaling 'llama3'"):
        hf.model_config_from_hf(dict(conf, rope_parameters={"rope_type": "llama3",
                                                            "rope_theta": 1e4}))
    with pytest.raises(ConfigError, match="hidden_act 'gelu'"):
        hf.model_config_from_hf(dict(conf, hidden_act="gelu"))
    # Mistral's sliding window: the imported model is limited to the window
    m = hf.model_config_from_hf(dict(conf, model_type="mistral", sliding_window=32))
    assert m.max_position_embeddings == 32 and m.seq_length == 32
    with pytest.raises(ConfigError, match="--seq-length: 48"):
        hf.model_config_from_hf(dict(conf, model_type="mistral", sliding_window=32),
                                seq_length=48)
    # export of what HF cannot express
    cfg = Config()
    cfg.qsparse.bitnet = True
    with pytest.raises(ConfigError, match="--bitnet"):
        hf.hf_config_from_ours(cfg, "llama")
    # an existing non-empty output directory is not overwritten
    os.makedirs(tmp_path / "full")
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        hf.write_hf_dir(str(tmp_path / "full"), {}, iter(()))


def test_export_shards_and_relu2_glu(tmp_path, tokens):
    """Our from-scratch FFN (relu2_glu) exports as hidden_act relu2; a small --max-shard-size
    gives several safetensors files with an index that transformers reads."""
    from megatron_qsparse.config import ModelConfig, QSparseConfig
    from megatron_qsparse.model.gpt import GPTModel

    cfg = Config()
    cfg.model = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                            num_query_groups=2, ffn_hidden_size=128, vocab_size=VOCAB,
                            make_vocab_size_divisible_by=128, seq_length=32)
    cfg.qsparse = QSparseConfig(mode="none")
    torch.manual_seed(1)
    model = GPTModel(cfg.model, 384).eval()  # padded 300 -> 384
    sd = model.state_dict()
    write_checkpoint(str(tmp_path / "ck"), cfg, lambda: iter(sd.items()))
    out = tmp_path / "hf"
    assert converter().main(["export-hf", "--load", str(tmp_path / "ck"), "--save", str(out),
                             "--max-shard-size", "60KB"]) == 0
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 2
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_act"] == "relu2" and config["tie_word_embeddings"] is True
    back = hf_class("llama").from_pretrained(str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(tokens).logits, model(tokens)[..., :VOCAB], **TOL)
    # the sharded directory imports back through its index
    assert converter().main(["import-hf", "--hf-dir", str(out), "--save",
                             str(tmp_path / "again")]) == 0
    again, cfg2 = load_model(str(tmp_path / "again"))
    assert cfg2.model.ffn_type == "relu2_glu"
    with torch.no_grad():
        torch.testing.assert_close(again(tokens), model(tokens)[..., :VOCAB], **TOL)


def test_exported_sparse_model_runs_sparsely_in_transformers(tool, models, tokens, tmp_path):
    """sparsify_hf_model puts the recorded Q-Sparse settings back into a transformers model."""
    from megatron_qsparse.convert.hf_sparse import sparsify_hf_model

    _, hf_dir = models["qwen2"]
    assert tool.main(["import-hf", "--hf-dir", hf_dir, "--save", str(tmp_path / "ck"),
                      "--qsparse-mode", "topk", "--qsparse-ratio", "0.5",
                      "--qsparse-down-ratio", "0.7"]) == 0
    ours, _ = _ours(str(tmp_path / "ck"))
    assert tool.main(["export-hf", "--load", str(tmp_path / "ck"), "--save",
                      str(tmp_path / "hf")]) == 0
    model = hf_class("qwen2").from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        dense = model(tokens).logits
        handles = sparsify_hf_model(model)
        assert len(handles) == 2 * 7
        sparse = model(tokens).logits
        want = ours(tokens)
    torch.testing.assert_close(sparse, want, **TOL)
    assert (sparse - dense).abs().max() > 1e-2
    for h in handles:
        h.remove()
    plain = hf_class("qwen2").from_pretrained(hf_dir)
    with pytest.raises(ValueError, match="no 'qsparse' section"):
        sparsify_hf_model(plain)
