"""Bad inputs fail loudly, at once, with the file: real .bin/.idx files truncated and bit-flipped,
text that is not UTF-8, bad JSONL, output paths that cannot be written. Through the validator,
the training data builder and the `token-objectives` commands, whose error is one line on stderr
and exit code 2, never a traceback. Files written are group-readable whatever the umask."""

from __future__ import annotations

import os
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from token_objectives.cli import main
from token_objectives.tables.errors import InputError
from token_objectives.tables.indexed_dataset import check_indexed_dataset

pytestmark = [
    pytest.mark.filterwarnings("ignore:Transformer Engine and Apex:UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

DOCUMENTS = [f"Document {i} holds {7 * i} apples and {i % 5} pears." for i in range(20)]
HEADER = 34  # magic 9, version 8, dtype code 1, sequence count 8, document count 8
SEQUENCES = len(DOCUMENTS)


@pytest.fixture
def prefix(tmp_path, sp_model_path) -> str:
    """A real indexed dataset of 20 documents, written by the quickstart's writer."""
    from token_objectives.quickstart.build_data import write_indexed_dataset

    write_indexed_dataset(DOCUMENTS, sp_model_path, tmp_path / "data")
    return str(tmp_path / "data")


def _flip(path: str, offset: int, value: int | None = None) -> None:
    """Flip the bits of byte `offset` of `path` (or set it to `value`)."""
    with open(path, "r+b") as file:
        file.seek(offset)
        old = file.read(1)[0]
        file.seek(offset)
        file.write(bytes([old ^ 0xFF if value is None else value]))


def _shrink(path: str, by: int) -> None:
    os.truncate(path, os.path.getsize(path) - by)


# (name, corruption of the prefix, the file the message names, what it says)
CORRUPTIONS = [
    ("truncated .bin", lambda p: _shrink(p + ".bin", 7), ".bin", r"the \.bin is truncated"),
    ("empty .bin", lambda p: os.truncate(p + ".bin", 0), ".bin", r"holds 0 bytes.*truncated"),
    ("longer .bin", lambda p: open(p + ".bin", "ab").write(b"\0\0"), ".bin", "stale"),
    ("empty .idx", lambda p: os.truncate(p + ".idx", 0), ".idx", "truncated or empty"),
    ("truncated .idx", lambda p: _shrink(p + ".idx", 8), ".idx", "truncated or corrupt"),
    ("magic", lambda p: _flip(p + ".idx", 3), ".idx", "magic"),
    ("version", lambda p: _flip(p + ".idx", 9), ".idx", "index version"),
    ("dtype code", lambda p: _flip(p + ".idx", 17, 99), ".idx", "dtype code 99"),
    ("other dtype", lambda p: _flip(p + ".idx", 17, 4), ".idx", "points to byte"),
    ("sequence count", lambda p: _flip(p + ".idx", 18), ".idx", "its header"),
    ("a size", lambda p: _flip(p + ".idx", HEADER + 4 * 3 + 3), ".idx", "sequence 3 has size"),
    ("a pointer", lambda p: _flip(p + ".idx", HEADER + 4 * SEQUENCES + 8 * 5 + 1), ".idx",
     "sequence 5 points to byte"),
    ("a document index", lambda p: _flip(p + ".idx", HEADER + 12 * SEQUENCES + 8 * 4), ".idx",
     "document indices"),
]
IDS = [name for name, *_ in CORRUPTIONS]


def test_a_sound_dataset_passes(prefix):
    info = check_indexed_dataset(prefix)
    assert (info.num_sequences, info.num_documents) == (SEQUENCES, SEQUENCES)
    assert info.num_tokens * info.dtype.itemsize == os.path.getsize(prefix + ".bin")


@pytest.mark.parametrize(("name", "corrupt", "suffix", "says"), CORRUPTIONS, ids=IDS)
def test_the_validator_names_the_file_and_the_fix(prefix, name, corrupt, suffix, says):
    corrupt(prefix)
    with pytest.raises(InputError, match=says) as error:
        check_indexed_dataset(prefix)
    assert prefix + suffix in str(error.value) and "rebuild it" in str(error.value)


def _one_error_line(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"token-objectives {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(("name", "corrupt", "suffix", "says"), CORRUPTIONS, ids=IDS)
def test_count_frequencies_refuses_a_bad_dataset(prefix, tmp_path, capsys, name, corrupt,
                                                 suffix, says):
    corrupt(prefix)
    output = tmp_path / "freq.safetensors"
    code = main(["count-frequencies", "--output", str(output), "--vocab-size", "1000",
                 "--no-progress", "--data-prefix", prefix])
    assert code == 2
    assert prefix + suffix in _one_error_line(capsys.readouterr().err, "count-frequencies")
    assert not output.exists()


@pytest.mark.parametrize("sidecar", [False, True], ids=["data", "loss-mask sidecar"])
def test_the_training_data_is_checked_before_megatron_reads_it(prefix, sp_model_path, tmp_path,
                                                               sidecar):
    """gpt_dataset fails at start-up, naming the file, before any process group or step."""
    from token_objectives.quickstart.build_data import write_indexed_dataset
    from token_objectives.tables.indexed_dataset import loss_mask_prefix
    from token_objectives.training.gpt_data import MegatronTokenizer, gpt_dataset

    target = prefix
    if sidecar:
        target = loss_mask_prefix(prefix)
        write_indexed_dataset(DOCUMENTS, sp_model_path, target)
    _shrink(target + ".bin", 2)
    with pytest.raises(InputError, match=r"\.bin is truncated") as error:
        gpt_dataset(prefix, 16, 0, MegatronTokenizer(str(sp_model_path)), None,
                    tmp_path / "cache")
    assert f"{target}.bin holds" in str(error.value)


def test_a_truncated_dataset_through_the_console_script(prefix, tmp_path):
    """A real process: exit code 2, one line on stderr, no traceback."""
    _flip(prefix + ".idx", 0)
    _shrink(prefix + ".bin", 1)
    result = subprocess.run(
        [sys.executable, "-m", "token_objectives.cli", "count-frequencies", "--output",
         str(tmp_path / "f.safetensors"), "--vocab-size", "1000", "--no-progress",
         "--data-prefix", prefix],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 2, result.stderr
    assert prefix + ".idx" in _one_error_line(result.stderr, "count-frequencies")


def test_a_dataset_rebuilt_at_the_same_path_rebuilds_its_cached_indices(
        process_group, sp_model_path, tmp_path, capsys):
    """The loops cache the GPTDataset indices under <output>/data_cache, keyed by the prefix
    and the config, not by the data: indices of the old .idx index into the new one."""
    from token_objectives.quickstart.build_data import write_indexed_dataset
    from token_objectives.training.gpt_data import MegatronTokenizer, gpt_dataset

    tokenizer = MegatronTokenizer(str(sp_model_path))
    prefix, cache = str(tmp_path / "data"), tmp_path / "out" / "data_cache"

    def samples(cache_dir) -> list[list[int]]:
        dataset = gpt_dataset(prefix, 16, 0, tokenizer, None, cache_dir)
        return [dataset[i]["tokens"].tolist() for i in range(len(dataset))]

    write_indexed_dataset(DOCUMENTS, sp_model_path, prefix)
    first = samples(cache)
    assert samples(cache) == first  # a cache hit, quietly
    assert "data_cache" not in capsys.readouterr().err
    write_indexed_dataset(DOCUMENTS[:5], sp_model_path, prefix)  # fewer, other documents
    rebuilt = samples(cache)
    note = capsys.readouterr().err.strip().splitlines()
    assert len(note) == 1 and f"{cache}: the cached indices of {prefix} were built" in note[0]
    assert f"from another {prefix}.idx" in note[0] and "rebuilding them" in note[0]
    assert rebuilt == samples(tmp_path / "fresh_cache") != first
    os.utime(prefix + ".idx", ns=(0, 0))  # touched, not changed: the cache stays
    assert samples(cache) == rebuilt and "data_cache" not in capsys.readouterr().err


# ------------------------------------------------------------------------------ other inputs


@pytest.fixture
def not_utf8(tmp_path) -> Path:
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"one fine line\n" + "caf\xe9 au lait\n".encode("latin-1"))
    return path


def _count_text(sp_model_path, tmp_path, *paths) -> list[str]:
    return ["count-frequencies", "--output", str(tmp_path / "freq.safetensors"), "--tokenizer",
            str(sp_model_path), "--no-progress", "--text", *map(str, paths)]


def test_text_that_is_not_utf8_names_the_line_and_the_byte(not_utf8, sp_model_path, tmp_path,
                                                           capsys):
    assert main(_count_text(sp_model_path, tmp_path, not_utf8)) == 2
    line = _one_error_line(capsys.readouterr().err, "count-frequencies")
    # Line 2 starts at byte 14; its "\xe9" is 3 bytes further.
    assert f"{not_utf8}:2: not UTF-8" in line and "at byte 17" in line and "iconv" in line


def test_bad_jsonl_names_the_line(sp_model_path, tmp_path, capsys):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "12 apples"}\n{"text": "3 pears"\n', encoding="utf-8")
    assert main(_count_text(sp_model_path, tmp_path, path)) == 2
    assert f"{path}:2: not a JSON object" in _one_error_line(capsys.readouterr().err,
                                                            "count-frequencies")


@pytest.mark.parametrize("kind", ["missing", "garbage json", "garbage model", "missing text"])
def test_bad_tokenizers_and_missing_files(kind, sp_model_path, tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("12 apples\n", encoding="utf-8")
    tokenizer = {"missing": tmp_path / "absent.model", "garbage json": tmp_path / "t.json",
                 "garbage model": tmp_path / "t.model", "missing text": sp_model_path}[kind]
    if kind.startswith("garbage"):
        tokenizer.write_bytes(b"\x00{not a tokenizer\n")
    if kind == "missing text":
        text = tmp_path / "absent.txt"
    assert main(_count_text(tokenizer, tmp_path, text)) == 2
    line = _one_error_line(capsys.readouterr().err, "count-frequencies")
    assert str(text if kind == "missing text" else tokenizer) in line


def test_a_missing_output_directory_fails_before_the_counting(sp_model_path, tmp_path, capsys,
                                                              monkeypatch):
    from token_objectives.tables import frequencies

    def never(*args, **kwargs):
        raise AssertionError("counted although the output cannot be written")

    monkeypatch.setattr(frequencies, "count_text_files", never)
    text = tmp_path / "corpus.txt"
    text.write_text("12 apples\n", encoding="utf-8")
    output = tmp_path / "no" / "such" / "freq.safetensors"
    args = _count_text(sp_model_path, tmp_path, text)
    args[2] = str(output)
    assert main(args) == 2
    line = _one_error_line(capsys.readouterr().err, "count-frequencies")
    assert f"the directory {output.parent} does not exist" in line and "mkdir -p" in line


def test_a_bug_keeps_its_traceback(prefix, tmp_path, monkeypatch):
    """Only bad inputs become one line: an error of the code itself propagates."""
    from token_objectives.tables import frequencies

    def broken(*args, **kwargs):
        raise ValueError("a bug, not an input")

    monkeypatch.setattr(frequencies, "count_indexed_dataset", broken)
    with pytest.raises(ValueError, match="a bug"):
        main(["count-frequencies", "--output", str(tmp_path / "f.safetensors"), "--vocab-size",
              "1000", "--no-progress", "--data-prefix", prefix])


# ------------------------------------------------------------------------ warnings: one line


def _tokenizer_lacking_digits(tmp_path: Path) -> Path:
    """A tokenizer.json whose only number token is "3": NTL can never predict 0-2 or 4-9."""
    from tokenizer_fixtures import word_level_tokenizer

    path = tmp_path / "tokenizer.json"
    word_level_tokenizer(["3", "x"]).save(str(path))
    return path


def test_a_warning_is_one_line_through_the_console_script(tmp_path):
    """A real process, the warnings shown as Python's defaults show them: the package's warning
    is the one line `token-objectives COMMAND: warning: ...`, without the source line Python
    prints under a warning."""
    env = {name: value for name, value in os.environ.items() if name != "PYTHONWARNINGS"}
    result = subprocess.run(
        [sys.executable, "-m", "token_objectives.cli", "inspect-vocab",
         str(_tokenizer_lacking_digits(tmp_path))],
        capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr.endswith("\n") and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("token-objectives inspect-vocab: warning: digit-level number "
                                    "tokens of "), result.stderr
    assert "lack the digits [0, 1, 2, 4, 5, 6, 7, 8, 9]" in result.stderr
    assert "Warning:" not in result.stderr and ".py:" not in result.stderr


def test_a_library_user_still_gets_a_python_warning(tmp_path, capsys):
    """Only the CLI's main prints the one line, and only while it runs: afterwards the same
    warning is a Python warning again."""
    import warnings

    from token_objectives.tables.errors import TokenObjectivesWarning
    from token_objectives.tables.numbers import NumberTable

    shown_before = warnings.showwarning
    path = _tokenizer_lacking_digits(tmp_path)
    assert main(["inspect-vocab", str(path)]) == 0
    assert "inspect-vocab: warning: digit-level" in capsys.readouterr().err
    assert warnings.showwarning is shown_before
    with pytest.warns(TokenObjectivesWarning, match="lack the digits"):
        NumberTable.from_tokenizer(path)


# -------------------------------------------------------------------------- ensemble inputs


def _ensemble(tmp_path, prompts: Path, output: Path | None = None) -> list[str]:
    # The models are never loaded: every error here comes before them.
    return ["ensemble", "--model", str(tmp_path / "model-a"), "--model", str(tmp_path / "b"),
            "--prompts", str(prompts), "--output", str(output or tmp_path / "out.jsonl")]


def test_ensemble_prompts_that_are_not_utf8(not_utf8, tmp_path, capsys):
    assert main(_ensemble(tmp_path, not_utf8)) == 2
    line = _one_error_line(capsys.readouterr().err, "ensemble")
    assert f"{not_utf8}:2: not UTF-8" in line and "at byte 17" in line


def test_ensemble_bad_jsonl_names_the_line(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a"}\n\n{"prompt": "b",}\n', encoding="utf-8")
    assert main(_ensemble(tmp_path, prompts)) == 2
    assert f"{prompts}:3: invalid JSON" in _one_error_line(capsys.readouterr().err, "ensemble")


def test_ensemble_missing_output_directory(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The train to\n", encoding="utf-8")
    output = tmp_path / "absent" / "out.jsonl"
    assert main(_ensemble(tmp_path, prompts, output)) == 2
    line = _one_error_line(capsys.readouterr().err, "ensemble")
    assert f"--output {output}: the directory {output.parent} does not exist" in line


@pytest.mark.parametrize("holds", [(), ("config.json",), ("config.json", "model.safetensors"),
                                   ("model.safetensors", "tokenizer.json")])
def test_ensemble_a_model_directory_without_a_model(tmp_path, capsys, holds):
    """Checked before any model loads: an empty directory is a transformers traceback today."""
    model = tmp_path / "model"
    model.mkdir()
    for name in holds:
        (model / name).write_text("{}")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The train to\n", encoding="utf-8")
    assert main(["ensemble", "--model", str(model), "--prompts", str(prompts), "--output",
                 str(tmp_path / "out.jsonl")]) == 2
    line = _one_error_line(capsys.readouterr().err, "ensemble")
    missing = [what for what, name in (("config.json", "config.json"),
                                       ("weights", "model.safetensors"),
                                       ("tokenizer", "tokenizer.json")) if name not in holds]
    assert f"--model {model} holds no {' and no '.join(missing)}; pass a local" in line
    assert "save_pretrained" in line and not (tmp_path / "out.jsonl").exists()


def test_correction_data_missing_output_directory(tmp_path, capsys):
    """Checked before the input is read and the model loaded (neither exists here)."""
    prefix = tmp_path / "absent" / "correction"
    assert main(["build-correction-data", "--input", str(tmp_path / "qa.jsonl"), "--model",
                 str(tmp_path / "model"), "--output-prefix", str(prefix)]) == 2
    line = _one_error_line(capsys.readouterr().err, "build-correction-data")
    assert f"the directory {prefix.parent} does not exist" in line


# ------------------------------------------------------------------------------ plan-memory

PLAN_MEMORY = ["plan-memory", "--config", "configs/deepspeed/llama3.2-3b.yaml",
               "--deepspeed_config", "configs/deepspeed/zero1.json"]


@pytest.mark.parametrize(("flag", "value", "accepts"), [
    ("--gpus", "0", "a positive integer"),
    ("--gpus", "-8", "a positive integer"),
    ("--gpu-memory", "nan", "a positive number of GiB"),
    ("--gpu-memory", "-80", "a positive number of GiB"),
    ("--gpu-memory", "inf", "a positive number of GiB"),
])
def test_plan_memory_refuses_a_count_below_one(flag, value, accepts, capsys, monkeypatch):
    """A usage error, before any config is read: --gpus 0 divided by zero, the rest gave a plan."""
    from torchrun_helpers import REPO

    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_info:
        main([*PLAN_MEMORY, flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"plan-memory: error: argument {flag}: {value!r} is not {accepts}" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("key", ["tensor_parallel.autotp_size", "train_micro_batch_size_per_gpu"])
def test_plan_memory_refuses_a_ds_config_count_below_one(key, capsys, monkeypatch):
    """autotp_size 0 divided by zero; a micro-batch of 0 gave a plan."""
    from torchrun_helpers import REPO

    monkeypatch.chdir(REPO)
    assert main([*PLAN_MEMORY, "--ds-set", f"{key}=0"]) == 2
    line = _one_error_line(capsys.readouterr().err, "plan-memory")
    assert f"configs/deepspeed/zero1.json: {key} is 0, plan-memory needs an integer >= 1" in line
    assert f"--ds-set {key}=N" in line


def test_plan_memory_refuses_a_run_config_count_below_one(capsys, monkeypatch):
    """The DeepSpeed plan's sequence length is the run config's, checked as the loop loads it."""
    from torchrun_helpers import REPO

    monkeypatch.chdir(REPO)
    assert main([*PLAN_MEMORY, "--set", "model.seq_length=-5"]) == 2
    assert "model.seq_length" in _one_error_line(capsys.readouterr().err, "plan-memory")


@pytest.mark.parametrize(("flag", "value", "replacement"), [
    ("--model-config", "configs/deepspeed/llama3.2-3b.json", "--set model.hf_config=PATH"),
    ("--seq-length", "4096", "--set model.seq_length=N"),
    ("--recompute", "full", "--set model.recompute=full|none"),
    ("--tp", "2", "--ds-set tensor_parallel.autotp_size=N"),
])
def test_plan_memory_names_what_replaces_a_dropped_flag(flag, value, replacement, capsys,
                                                        monkeypatch):
    """The DeepSpeed mode reads the loop's two files; its old flags would plan another run."""
    from torchrun_helpers import REPO

    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_info:
        main([*PLAN_MEMORY, flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"plan-memory: error: {flag} is no longer read: " in err and replacement in err
    assert "Traceback" not in err


def test_plan_memory_refuses_a_ds_config_as_the_run_config(capsys, monkeypatch):
    from torchrun_helpers import REPO

    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_info:
        main(["plan-memory", "--config", "configs/deepspeed/zero1.json"])
    assert exit_info.value.code == 2
    assert ("--config configs/deepspeed/zero1.json is a ds_config: pass it as "
            "--deepspeed_config" in capsys.readouterr().err)


def test_plan_memory_refuses_spec_with_a_ds_config(capsys, monkeypatch):
    """--spec is the Megatron loop's layer spec: with --deepspeed_config it was ignored."""
    from torchrun_helpers import REPO

    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_info:
        main([*PLAN_MEMORY, "--spec", "local"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert ("plan-memory: error: --spec local picks the Megatron loop's layer spec, which the "
            "DeepSpeed loop does not have" in err and "leave --spec out with --deepspeed_config"
            in err)
    assert "Traceback" not in err


@pytest.mark.parametrize(("setting", "says"), [
    (["--set", "parallel.tensor=4", "--ds-set", "tensor_parallel.autotp_size=2"],
     "parallel.tensor = 4 in the run config, tensor_parallel.autotp_size = 2 in the ds_config"),
    (["--set", "model.recompute=selective"], "model.recompute: selective is the Megatron loop's"),
    (["--set", "model.fused_lm_head=true", "--ds-set", "zero_optimization.stage=3"],
     "model.fused_lm_head needs the whole lm_head weight on each rank"),
    (["--ds-set", 'token_objectives={"fused_lm_head": true}'],
     'the ds_config has a "token_objectives" section'),
])
def test_plan_memory_refuses_what_the_deepspeed_loop_refuses(setting, says, capsys,
                                                             monkeypatch):
    """check_run_config and uses_fused_head, the loop's own checks, with their messages."""
    from torchrun_helpers import REPO

    monkeypatch.chdir(REPO)
    assert main([*PLAN_MEMORY, *setting]) == 2
    assert says in _one_error_line(capsys.readouterr().err, "plan-memory")


# ------------------------------------------------------------------------------ file modes


@pytest.fixture
def strict_umask():
    old = os.umask(0o077)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_frequencies_are_group_readable_whatever_the_umask(prefix, tmp_path, strict_umask):
    output = tmp_path / "freq.safetensors"
    common = ["count-frequencies", "--vocab-size", "1000", "--no-progress", "--data-prefix",
              prefix, "--output", str(output)]
    assert main(common) == 0
    assert _mode(output) == 0o644
    assert main([*common, "--mode", "640"]) == 0
    assert _mode(output) == 0o640


def test_the_quickstart_writer_is_group_readable_whatever_the_umask(prefix, strict_umask,
                                                                    sp_model_path, tmp_path):
    from token_objectives.quickstart.build_data import write_indexed_dataset

    write_indexed_dataset(DOCUMENTS, sp_model_path, tmp_path / "strict")
    for suffix in (".bin", ".idx"):
        assert _mode(f"{tmp_path / 'strict'}{suffix}") == 0o644


def test_a_bad_mode_is_a_usage_error(prefix, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["count-frequencies", "--vocab-size", "1000", "--data-prefix", prefix, "--output",
              str(tmp_path / "f"), "--mode", "rw-r--r--"])
    assert exit_info.value.code == 2
    assert "not an octal file mode" in capsys.readouterr().err


def test_header_layout_is_megatron_cores(prefix):
    """The offsets the corruptions above use: megatron-core's own reader agrees."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    index = IndexedDataset(prefix).index
    with open(prefix + ".idx", "rb") as file:
        raw = file.read()
    assert struct.unpack_from("<Q", raw, 18)[0] == len(index) == SEQUENCES
    assert struct.unpack_from("<i", raw, HEADER + 4 * 3)[0] == index.sequence_lengths[3]
    start = HEADER + 4 * SEQUENCES + 8 * 5
    assert struct.unpack_from("<q", raw, start)[0] == index.sequence_pointers[5]


@pytest.mark.parametrize("launcher, arguments, says", [
    ("pretrain_megatron.py", ["--config", "configs/tiny.yaml", "--set", "train.steps=0"],
     "train.steps"),
    ("pretrain_megatron.py", ["--config", "configs/none.yaml"], "configs/none.yaml"),
    ("pretrain_deepspeed.py", ["--config", "configs/deepspeed/tiny.yaml", "--deepspeed_config",
                               "configs/deepspeed/zero2.json", "--set", "train.lr=0.5"],
     "train.lr = 0.5 in the run config, optimizer.params.lr = 0.001 in the ds_config"),
])
def test_a_launcher_refuses_a_bad_config_in_one_line(launcher, arguments, says):
    """A bad run config (or a run config and a ds_config that disagree) stops the launcher
    before any process group with one stderr line per node naming the key, exit status 2,
    not a traceback."""
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(repo / "launch" / launcher), *arguments],
                          cwd=repo, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    ours = [line for line in done.stderr.splitlines() if line.startswith(f"{launcher}: ")]
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(ours) == 1 and ours[0].startswith(f"{launcher}: error: ") and says in ours[0], (
        done.stderr[-3000:])
    assert "Traceback" not in done.stderr
