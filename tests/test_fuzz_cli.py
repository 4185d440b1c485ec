"""Fuzzed argument values for each command end in exit 0, 1 or 2, never in a traceback or an
internal error. Exports are kept fast: every fuzzed export is a --dry-run or aims at a directory that holds a
user's file (so it must be refused); nothing is ever written."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from star_export.cli import export_main, run_main, validate_main

SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], derandomize=True)
JUNK = st.sampled_from(["", "-0", "1e309", "0x10", " 5 ", "nan", "inf", "-inf", "1.5", "٣", "None", "--", "-1", "99999999999999999999"])
NUMBER = st.one_of(st.integers(-10**6, 10**6).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr), JUNK, st.text(max_size=6))
TEXT = st.text(max_size=40)


def _argv(flags: dict) -> list[str]:
    out = []
    for flag, value in flags.items():
        out += [flag] if value is True else [flag, value]
    return out


def _call(main, argv, capsys) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse: usage errors (2), --help / --version (0)
        rc = e.code
    return rc, capsys.readouterr().err


def _check(rc, err):
    assert rc in (0, 1, 2), f"exit {rc}\n{err}"
    assert "Traceback" not in err and "internal error" not in err, err
    if rc == 2:
        assert "error" in err


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("user") / "work"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    return d


EXPORT_FLAGS = {
    "--model": st.one_of(st.sampled_from(["tiny-llava", "llava-1.5-7b", "llava-1.5-13b", "org/name", "./nope", "/", ""]), TEXT),
    "--keep": NUMBER, "--stage1-keep": NUMBER, "--pivot-layer": NUMBER,
    "--backend": st.one_of(st.sampled_from(["onnx", "tensorrt"]), TEXT), "--dtype": st.one_of(st.sampled_from(["float32", "float16", "bfloat16"]), TEXT),
    "--max-batch-size": NUMBER, "--max-input-len": NUMBER, "--max-new-tokens": NUMBER, "--text-tokens": NUMBER,
    "--force": st.just(True), "--json": st.just(True), "--no-validate": st.just(True), "--quiet": st.just(True),
}


@SETTINGS
@given(flags=st.fixed_dictionaries({}, optional=EXPORT_FLAGS), dry=st.booleans())
def test_fuzz_star_export(flags, dry, user_dir, capsys):
    argv = _argv(flags) + (["--dry-run"] if dry else ["--out", str(user_dir)])
    _check(*_call(export_main, argv, capsys))
    assert sorted(p.name for p in user_dir.parent.iterdir()) == ["work"] and [p.name for p in user_dir.iterdir()] == ["notes.txt"]


@pytest.fixture(scope="module")
def image_choices(tmp_path_factory):
    from star_export.runtime.inputs import synthetic_image

    d = tmp_path_factory.mktemp("images")
    synthetic_image(1).save(d / "ok.png")
    (d / "text.png").write_text("not an image")
    return [str(d / "ok.png"), str(d / "text.png"), str(d / "missing.png"), str(d)]


RUN_FLAGS = {
    "--max-new-tokens": NUMBER, "--temperature": NUMBER, "--top-p": NUMBER, "--seed": NUMBER,
    "--provider": st.one_of(st.sampled_from(["auto", "cpu", "cuda", "tensorrt"]), TEXT),
    "--stream": st.just(True), "--json": st.just(True), "--quiet": st.just(True), "--allow-fallback": st.just(True),
}


@settings(SETTINGS, max_examples=50)
@given(flags=st.fixed_dictionaries({}, optional=RUN_FLAGS), requests=st.lists(st.tuples(st.integers(0, 3), TEXT), min_size=0, max_size=3))
def test_fuzz_star_run(flags, requests, tiny_engine, image_choices, capsys):
    pairs = [a for i, prompt in requests for a in ("--image", image_choices[i], "--prompt", prompt)]
    _check(*_call(run_main, [str(tiny_engine), *pairs, *_argv(flags)], capsys))


VALIDATE_FLAGS = {
    "--model": st.sampled_from(["tiny-llava", "llava-1.5-7b", "./nope", "org/name"]),
    "--device": st.one_of(st.sampled_from(["cpu", "cuda"]), TEXT), "--provider": st.sampled_from(["auto", "cpu", "cuda", "gpu"]),
    "--max-new-tokens": NUMBER, "--image": st.sampled_from(["missing.png", "."]), "--prompt": TEXT,
    "--json": st.just(True), "--allow-fallback": st.just(True),
}


@settings(SETTINGS, max_examples=15)
@given(flags=st.fixed_dictionaries({}, optional=VALIDATE_FLAGS))
def test_fuzz_star_validate(flags, tiny_engine, capsys):
    flags.setdefault("--max-new-tokens", "2")
    _check(*_call(validate_main, [str(tiny_engine), *_argv(flags)], capsys))
