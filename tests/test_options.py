"""Options are defined once (options.py): the command lines' flags and the server's request
parameters are derived from the dataclasses' fields, and these tests fail when they drift."""

import pytest

from mlx_starflow.cli import api, benchmark, flags, score, server
from mlx_starflow.cli.common import flag_of
from mlx_starflow.options import GenerateOptions, LoadOptions, OptionError, specs


def actions(p) -> dict:
    return {a.dest: a for a in p._actions if a.option_strings}


@pytest.mark.parametrize("cls", [GenerateOptions, LoadOptions])
def test_generate_has_one_flag_per_field_with_its_default_choices_and_limits(cls):
    acts = actions(flags.parser())
    for name, default, m in specs(cls):
        if not m["cli"]:
            continue
        a = acts[name]
        assert flag_of(name, m) in a.option_strings
        assert a.default == default, name
        assert (tuple(a.choices) if a.choices else None) == m["choices"], name
        assert a.help.startswith(m["help"]), name
        if m["low"] is not None and m["high"] is not None and m["kind"] is not str:
            assert f"[{m['low']}..{m['high']}]" in a.help, name  # the limit is stated in --help


def test_score_server_and_benchmark_take_the_same_loading_flags():
    want = {n: flag_of(n, m) for n, _, m in specs(LoadOptions) if m["cli"]}
    for p, skip in ((score.parser(), score.SKIP), (server.parser(), ())):
        acts = actions(p)
        for name, flag in want.items():
            if name not in skip:
                assert flag in acts[name].option_strings, (p.prog, name)
    acts = actions(benchmark.parser())
    for name in benchmark.LOAD:
        assert want[name] in acts[name].option_strings


def test_server_parameters_are_the_request_fields():
    for name, _, m in specs(GenerateOptions):
        if m["request"] is True:
            kind = {str: "string", int: "integer", float: "number"}[m["kind"]]
            assert api.PARAMS[name] == kind, name
    assert set(api.OPTIONS) == {n for n, _, m in specs(GenerateOptions) if m["request"] is True} - {"seed"}
    # every parameter that sets work has its limit in the options, the one place it is checked
    for name in ("jacobi_block_size", "jacobi_threshold", "jacobi_max_iter", "guidance", "num_images"):
        m = dict((n, m) for n, _, m in specs(GenerateOptions))[name]
        assert m["high"] is not None


def test_a_new_field_reaches_every_front_end(monkeypatch):
    """Adding an option is one field: the CLI gets its flag, its limits are checked."""
    from dataclasses import field, make_dataclass

    from mlx_starflow.cli.common import add_fields, new_parser
    from mlx_starflow.options import meta

    extended = make_dataclass(
        "Extended",
        [("steps", int, field(default=3, metadata=meta("denoising steps", kind=int, low=1, high=9, request=True)))],
        bases=(GenerateOptions,),
    )
    p = new_parser("generate", "x")
    add_fields(p, extended)
    assert actions(p)["steps"].option_strings == ["--steps"] and p.parse_args(["--steps", "5"]).steps == 5
    with pytest.raises(OptionError, match="steps must be a whole number from 1 to 9"):
        extended("x", steps=10).validate()


def test_limits_hold_in_the_api():
    for kwargs, option in (
        (dict(jacobi_max_iter=10**15), "jacobi_max_iter"),
        (dict(jacobi_threshold=float("nan")), "jacobi_threshold"),
        (dict(num_images=10**6), "num_images"),
        (dict(seed=-1), "seed"),
        (dict(seed=2**64), "seed"),
        (dict(height=10**6), "height"),
        (dict(guidance=1e9), "guidance"),
    ):
        with pytest.raises(OptionError) as e:
            GenerateOptions("a cat", **kwargs).validate()
        assert e.value.option == option
    with pytest.raises(OptionError) as e:
        LoadOptions(vae_tile=10**9).validate()
    assert e.value.option == "vae_tile"


def test_precision_is_another_name_for_dtype():
    """Issue 22 calls the choice `--precision auto`: the same option as --dtype, one definition."""
    from mlx_starflow.cli import benchmark, generate, score

    for build, required in (
        (generate.parser, []),
        (score.parser, ["--image", "x.png", "--prompt", "p"]),
        (benchmark.parser, []),
    ):
        p = build()
        assert p.parse_args([*required, "--precision", "bfloat16"]).dtype == "bfloat16"
        assert p.parse_args([*required, "--dtype", "float32"]).dtype == "float32"
