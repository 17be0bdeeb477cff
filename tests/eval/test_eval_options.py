"""`pgolf eval` refuses numeric options outside their range as a usage error, naming the option."""

import pytest

from pgolf.cli import main as cli_main
from pgolf.config import ConfigError
from pgolf.eval.run import EVAL_OPTION_RULES, TTT_OPTION_RULES, EvalOptions, check_eval_options
from pgolf.eval.ttt import TTTConfig
from pgolf.rules import EXIT_USAGE


@pytest.mark.parametrize("option, value, message", [
    ("--max-tokens", "-1", "--max-tokens must be >= 0, got -1"),
    ("--batch", "0", "--batch must be positive (>= 1), got 0"),
    ("--stride", "0", "--stride must be positive (>= 1), got 0"),
    ("--seq-len", "-8", "--seq-len must be positive (>= 1), got -8"),
    ("--budget", "0", "--budget must be positive (> 0), got 0.0"),
    ("--budget", "nan", "--budget must be a finite number"),
    ("--ttt-chunk", "0", "--ttt-chunk must be positive (>= 1)"),
    ("--ttt-lr", "nan", "--ttt-lr must be a finite number"),
    ("--ttt-lr", "-0.1", "--ttt-lr must be >= 0"),
    ("--ttt-momentum", "1", "--ttt-momentum must be within [0, 1)"),
    ("--ttt-epochs", "-1", "--ttt-epochs must be >= 0"),
    ("--ttt-freeze", "-2", "--ttt-freeze must be >= 0"),
    ("--ttt-clip", "inf", "--ttt-clip must be a finite number"),
    ("--ttt-batch", "0", "--ttt-batch must be positive (>= 1)"),
])
def test_bad_eval_options_are_usage_errors(tmp_path, capsys, option, value, message):
    # Checked before the target is read: a missing run would otherwise exit 1.
    code = cli_main(["eval", str(tmp_path / "no_such_run"), "--ttt", option, value])
    assert code == EXIT_USAGE
    assert message in capsys.readouterr().err


def test_every_numeric_eval_option_has_a_rule():
    numeric = {"int", "float", "int | None", "float | None"}
    for cls, rules in ((EvalOptions, EVAL_OPTION_RULES), (TTTConfig, TTT_OPTION_RULES)):
        fields = {name for name, kind in cls.__annotations__.items() if str(kind) in numeric}
        assert fields == set(rules), cls.__name__


def test_defaults_pass_and_run_eval_checks_too():
    check_eval_options(EvalOptions(), TTTConfig())
    with pytest.raises(ConfigError, match="--max-tokens must be >= 0"):
        check_eval_options(EvalOptions(max_tokens=-1))
