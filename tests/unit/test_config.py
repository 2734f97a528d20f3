"""Configuration: the CLI generated from the dataclasses, YAML files, and every validation error."""

import dataclasses
import subprocess
import sys

import pytest

from megatron_qsparse.arguments import build_parser, parse
from megatron_qsparse.config import (SECTIONS, Config, ConfigError, flag_of, grad_accumulation_steps,
                                     padded_vocab_size, validate)

BASE = ["--data-path", "data/corpus_text_document", "--tokenizer-type", "ByteTokenizer"]


def parse_ok(*argv, world_size=None) -> Config:
    return parse([*BASE, *argv], world_size=world_size)


def parse_err(capsys, *argv, base=BASE, world_size=None) -> str:
    with pytest.raises(SystemExit) as exc:
        parse([*base, *argv], world_size=world_size)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 or "usage:" in err, err  # one line (argparse adds usage)
    return err.splitlines()[-1]


def test_defaults_parse_and_match_dataclasses():
    cfg = parse_ok()
    default = Config()
    assert cfg.model == default.model
    assert cfg.qsparse == default.qsparse
    assert cfg.data.data_path == ["data/corpus_text_document"]


def test_megatron_flag_spelling():
    cfg = parse_ok("--num-layers", "3", "--hidden-size", "64", "--ffn-hidden-size", "96",
                   "--num-attention-heads", "8", "--num-query-groups", "2", "--seq-length", "64",
                   "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "1e-3",
                   "--min-lr", "1e-4", "--lr-warmup-iters", "5", "--lr-decay-style", "linear",
                   "--train-iters", "50", "--eval-interval", "10", "--eval-iters", "2",
                   "--split", "90,10,0", "--save", "ck", "--save-interval", "5", "--load", "ck",
                   "--tensorboard-dir", "tb", "--log-interval", "1", "--bf16", "--seed", "7",
                   "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1",
                   "--deepspeed", "--qsparse-ratio", "0.6", "--qsparse-down-ratio", "0.7",
                   "--qsparse-mode", "topk", "--no-ste", "--bitnet")
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.ffn_hidden_size) == (3, 64, 96)
    assert cfg.model.num_query_groups == 2 and cfg.train.global_batch_size == 8
    assert cfg.train.bf16 and cfg.parallel.deepspeed and cfg.qsparse.bitnet
    assert cfg.qsparse.ste is False
    assert cfg.qsparse.ratio_for("down") == 0.7 and cfg.qsparse.ratio_for("qkv") == 0.6
    assert cfg.train.lr_decay_style == "linear" and cfg.train.seed == 7


def test_weighted_data_path():
    cfg = parse(["--data-path", "0.3", "a", "0.7", "b", "--tokenizer-type", "ByteTokenizer"])
    assert cfg.data.data_path == ["0.3", "a", "0.7", "b"]


def test_every_field_has_a_flag_with_help():
    parser = build_parser()
    helps = {a.dest: a.help for a in parser._actions}
    for section in SECTIONS:
        for f in dataclasses.fields(getattr(Config(), section)):
            dest = f"{section}.{f.name}"
            assert dest in helps, dest
            assert helps[dest] and "\n" not in helps[dest], dest


def test_help_lists_every_flag():
    out = subprocess.run([sys.executable, "pretrain_qsparse.py", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for section in SECTIONS:
        for f in dataclasses.fields(getattr(Config(), section)):
            assert flag_of(section, f.name) in out


def test_yaml_config_and_cli_override(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("num-layers: 6\nhidden_size: 256\nmodel:\n  seq-length: 64\n"
                 "no-ste: true\nqsparse-ratio: 0.25\ndata-path: [a, b]\n"
                 "tokenizer-type: ByteTokenizer\n")
    cfg = parse(["--config", str(y), "--num-layers", "2"])
    assert cfg.model.num_layers == 2  # the command line wins
    assert cfg.model.hidden_size == 256 and cfg.model.seq_length == 64
    assert cfg.qsparse.ste is False and cfg.qsparse.ratio == 0.25
    assert cfg.data.data_path == ["a", "b"]


@pytest.mark.parametrize("text,needle", [
    ("num-layerz: 2\n", "unknown key 'num-layerz'"),
    ("num-layers: two\n", "not a valid int"),
    ("qsparse-mode: topq\n", "is not one of"),
    ("- a\n- b\n", "must hold a mapping"),
    ("a: [\n", "is not valid YAML"),
])
def test_yaml_errors(tmp_path, capsys, text, needle):
    y = tmp_path / "bad.yaml"
    y.write_text(text)
    assert needle in parse_err(capsys, "--config", str(y))


def test_yaml_missing_file(capsys):
    assert "not found" in parse_err(capsys, "--config", "/nonexistent.yaml")


# (argv, world_size, expected fragment) for every error path of config.validate
ERRORS = [
    (["--num-layers", "0"], None, "--num-layers: got 0"),
    (["--hidden-size", "-4"], None, "--hidden-size: got -4"),
    (["--hidden-size", "100", "--num-attention-heads", "3"], None,
     "--num-attention-heads: hidden size 100 is not divisible by 3 heads"),
    (["--hidden-size", "30", "--num-attention-heads", "2"], None, "--kv-channels: head width 15 is odd"),
    (["--num-attention-heads", "4", "--num-query-groups", "3"], None,
     "--num-query-groups: 4 heads are not divisible into 3 groups"),
    (["--seq-length", "128", "--max-position-embeddings", "64"], None,
     "--max-position-embeddings: 64 is shorter than --seq-length 128"),
    (["--norm-epsilon", "0"], None, "--norm-epsilon"),
    (["--init-method-std", "0"], None, "--init-method-std"),
    (["--hidden-dropout", "1.0"], None, "--hidden-dropout: got 1.0"),
    (["--attention-dropout", "-0.1"], None, "--attention-dropout"),
    (["--qsparse-ratio", "1.0"], None, "--qsparse-ratio: sparsity ratio 1.0 is outside [0, 1)"),
    (["--qsparse-gate-up-ratio", "-0.1"], None, "--qsparse-gate-up-ratio"),
    (["--qsparse-mode", "block", "--qsparse-block", "4:2"], None, "--qsparse-block: '4:2'"),
    (["--qsparse-mode", "block", "--qsparse-block", "two"], None, "--qsparse-block: 'two'"),
    (["--qsparse-mode", "relu", "--qsparse-o-ratio", "0.3"], None,
     "--qsparse-mode: per-projection ratios have no effect"),
    (["--qsparse-warmup-iters", "-1"], None, "--qsparse-warmup-iters: got -1"),
    (["--qsparse-mode", "none", "--qsparse-warmup-iters", "5"], None,
     "--qsparse-warmup-iters: a sparsity warm-up needs a sparsifier"),
    (["--qsparse-mode", "block", "--qsparse-rescale", "l2"], None,
     "--qsparse-rescale: rescaling applies to top-K only"),
    (["--tensor-model-parallel-size", "0"], None, "--tensor-model-parallel-size: got 0"),
    (["--tensor-model-parallel-size", "8"], None,
     "--num-attention-heads: 4 is not divisible by --tensor-model-parallel-size 8"),
    (["--tensor-model-parallel-size", "2", "--num-query-groups", "1"], None,
     "--num-query-groups: 1 is not divisible by --tensor-model-parallel-size 2"),
    (["--tensor-model-parallel-size", "2", "--ffn-hidden-size", "99"], None,
     "--ffn-hidden-size: 99 is not divisible by --tensor-model-parallel-size 2"),
    (["--tensor-model-parallel-size", "4", "--qsparse-mode", "block", "--qsparse-block", "1:64"],
     None, "--qsparse-block: the attention output projection's input is split into slices of 32"),
    (["--tensor-model-parallel-size", "2"], 3,
     "--tensor-model-parallel-size: world size 3 is not divisible by TP x PP = 2"),
    (["--pipeline-model-parallel-size", "3"], None,
     "--pipeline-model-parallel-size: 3 stages for 2 transformer blocks"),
    (["--pipeline-model-parallel-size", "2", "--zero-stage", "2"], None,
     "--zero-stage: ZeRO-2 partitions gradients"),
    (["--pipeline-model-parallel-size", "2", "--tensor-model-parallel-size", "2"], 6,
     "--tensor-model-parallel-size: world size 6 is not divisible by TP x PP = 4"),
    (["--recompute-activations", "--recompute-granularity", "full"], None,
     "--recompute-activations: asks for selective recomputation"),
    (["--distributed-timeout-minutes", "0"], None, "--distributed-timeout-minutes"),
    (["--deepspeed-config", "/nonexistent.json"], None, "--deepspeed-config: file"),
    (["--split", "1,2,3,4"], None, "--split"),
    (["--split", "0,1,0"], None, "--split"),
    (["--num-workers", "-1"], None, "--num-workers: got -1"),
    (["--micro-batch-size", "0"], None, "--micro-batch-size: got 0"),
    (["--train-iters", "0"], None, "--train-iters: got 0"),
    (["--eval-iters", "-1"], None, "--eval-iters: got -1"),
    (["--lr", "0"], None, "--lr: got 0"),
    (["--lr", "1e-3", "--min-lr", "1e-2"], None, "--min-lr: 0.01 is not within"),
    (["--train-iters", "10", "--lr-warmup-iters", "20"], None,
     "--lr-warmup-iters: warm-up (20) is longer than the decay (10)"),
    (["--adam-beta2", "1.0"], None, "--adam-beta2: got 1.0"),
    (["--adam-eps", "0"], None, "--adam-eps"),
    (["--weight-decay", "-1"], None, "--weight-decay"),
    (["--clip-grad", "-1"], None, "--clip-grad"),
    (["--save-interval", "10"], None, "--save-interval: a save interval without a save directory"),
    (["--global-batch-size", "6", "--micro-batch-size", "4"], 1,
     "--global-batch-size: 6 is not divisible by micro-batch 4 x data-parallel size 1"),
    (["--global-batch-size", "12", "--micro-batch-size", "4"], 2,
     "--global-batch-size: 12 is not divisible by micro-batch 4 x data-parallel size 2"),
    (["--log-interval", "0"], None, "--log-interval: got 0"),
    (["--keep-last-n-checkpoints", "0", "--save", "c"], None, "--keep-last-n-checkpoints: got 0"),
    (["--keep-last-n-checkpoints", "2"], None,
     "--keep-last-n-checkpoints: no checkpoints are saved"),
    (["--exit-interval", "0"], None, "--exit-interval: got 0"),
    (["--exit-duration-in-mins", "0"], None, "--exit-duration-in-mins: got 0"),
    (["--max-consecutive-skipped-iters", "0"], None, "--max-consecutive-skipped-iters: got 0"),
    (["--loss-spike-factor", "0.5"], None, "--loss-spike-factor: got 0.5"),
    (["--finetune"], None, "--finetune: nothing to fine-tune from"),
    (["--lr-decay-style", "WSD"], None, "--lr-wsd-decay-iters: WSD needs the length"),
    (["--lr-decay-style", "WSD", "--train-iters", "10", "--lr-warmup-iters", "5",
      "--lr-wsd-decay-iters", "6"], None, "--lr-wsd-decay-iters: warm-up (5) + decay (6) exceed"),
    (["--lr-wsd-decay-iters", "6"], None, "--lr-wsd-decay-iters: only used with --lr-decay-style WSD"),
    (["--lr-wsd-decay-iters", "0", "--lr-decay-style", "WSD"], None, "--lr-wsd-decay-iters: got 0"),
]


@pytest.mark.parametrize("argv,world_size,needle", ERRORS, ids=[" ".join(e[0]) for e in ERRORS])
def test_validation_errors(capsys, argv, world_size, needle):
    err = parse_err(capsys, *argv, world_size=world_size)
    assert err.startswith("error: ") and needle in err, err


def test_missing_data_path(capsys):
    err = parse_err(capsys, base=["--tokenizer-type", "ByteTokenizer"])
    assert "--data-path: no dataset given" in err and "preprocess_data.py" in err


def test_bad_blend_weights(capsys):
    err = parse_err(capsys, base=["--data-path", "0.5", "a", "b", "--tokenizer-type",
                                  "ByteTokenizer"])
    assert err.startswith("error: ")


def test_sentencepiece_needs_model(capsys):
    err = parse_err(capsys, base=["--data-path", "a"])
    assert "--tokenizer-model: SentencePieceTokenizer needs a model file" in err


def test_argparse_rejects_bad_choice(capsys):
    with pytest.raises(SystemExit):
        parse([*BASE, "--qsparse-mode", "topq"])
    assert "invalid choice" in capsys.readouterr().err


def test_validate_is_direct_api():
    cfg = parse_ok()
    cfg.model.num_layers = -1
    with pytest.raises(ConfigError, match="--num-layers"):
        validate(cfg)


def test_derived_sizes():
    cfg = parse_ok("--micro-batch-size", "2", "--global-batch-size", "16", world_size=2)
    assert grad_accumulation_steps(cfg, 2) == 4
    assert padded_vocab_size(4000, cfg) == 4096
    assert padded_vocab_size(4096, cfg) == 4096
    assert cfg.model.resolved_ffn_hidden_size() == 384  # 8/3 * 128 -> 341.3 -> multiple of 64
    assert cfg.model.resolved_kv_channels() == 32


def test_config_dict_round_trip():
    cfg = parse_ok("--num-layers", "5", "--qsparse-ratio", "0.3")
    again = Config.from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(ConfigError, match="unknown setting model.bogus"):
        Config.from_dict({"model": {"bogus": 1}})
