"""`explain`: convolution by hand agrees with PyTorch; the output-size formula solved for each unknown."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from cnnlab.models import explain as E
from cnnlab import cli


@st.composite
def conv_cases(draw):
    h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    kh, kw = draw(st.integers(1, h + 2 * ph)), draw(st.integers(1, w + 2 * pw))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    value = st.floats(-5, 5, allow_nan=False, width=32) | st.integers(-5, 5).map(float)
    x = draw(st.lists(st.lists(value, min_size=w, max_size=w), min_size=h, max_size=h))
    k = draw(st.lists(st.lists(value, min_size=kw, max_size=kw), min_size=kh, max_size=kh))
    return x, k, (ph, pw), (sh, sw)


@settings(max_examples=100, deadline=None)
@given(conv_cases(), st.booleans())
def test_conv_agrees_with_pytorch(case, flip):
    x, k, padding, stride = case
    got = E.conv2d(x, k, padding, stride, flip=flip)
    kt = torch.tensor(k, dtype=torch.float64)[None, None]
    if flip:
        kt = torch.flip(kt, dims=(2, 3))  # convolution = cross-correlation with the kernel rotated 180 degrees
    want = F.conv2d(torch.tensor(x, dtype=torch.float64)[None, None], kt, padding=padding, stride=stride)[0, 0]
    assert torch.allclose(torch.tensor(got.output, dtype=torch.float64), want, atol=1e-9)
    assert len(got.cells) == want.numel()


def test_the_worked_example():
    e = E.conv2d(E.parse_matrix("[[2,1,0],[0,3,1],[4,0,2]]"), E.kernel_from("sobel-y")[1], 1, 1, kernel_name="sobel-y")
    assert e.output == [[3, 7, 5], [3, 2, 3], [-3, -7, -5]]
    assert e.cells[0] == "out[0,0] = 0*(-1) + 0*(-2) + 0*(-1) + 0*0 + 2*0 + 1*0 + 0*1 + 0*2 + 3*1 = 3"
    assert "floor((3 - 3 + 2*1) / 1) + 1 = 3" in e.text()
    flipped = E.conv2d(E.parse_matrix("[[2,1,0],[0,3,1],[4,0,2]]"), E.KERNELS["sobel-y"], 1, 1, flip=True)
    assert flipped.output == [[-v for v in row] for row in e.output]  # sobel-y is antisymmetric top-bottom


def test_kernels_and_bad_input():
    assert set(E.KERNELS) == {"sobel-x", "sobel-y", "laplacian", "box", "identity", "sharpen"}
    x = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]
    assert E.conv2d(x, E.KERNELS["identity"], 1).output == x
    assert E.conv2d(x, E.KERNELS["box"]).output[0][0] == pytest.approx(5.0)
    assert E.kernel_from("[[1, 0], [0, -1]]") == ("given", [[1.0, 0.0], [0.0, -1.0]])
    assert E.parse_matrix("1 2; 3 4") == [[1.0, 2.0], [3.0, 4.0]]
    with pytest.raises(E.ExplainError, match="sobel-x"):
        E.kernel_from("sobelx")
    with pytest.raises(E.ExplainError, match="--input.*different lengths"):
        E.parse_matrix("[[1,2],[3]]")
    with pytest.raises(E.ExplainError, match="does not fit"):
        E.conv2d([[1.0]], E.KERNELS["laplacian"])


def test_solve_for_each_unknown():
    sol = E.solve_output_size(input=32, kernel=5, stride=1, output=32)
    assert sol.unknown == "padding" and sol.values == [2]
    none = E.solve_output_size(input=32, kernel=4, stride=1, output=32)
    assert none.values == [] and "no integer padding" in none.text() and "P = 1.5" in none.text()
    assert E.solve_output_size(input=32, kernel=3, padding=1, stride=2).values == [16]
    assert E.solve_output_size(kernel=3, padding=1, stride=2, output=16).values == [31, 32]
    assert E.solve_output_size(input=32, padding=1, stride=2, output=16).values == [3, 4]
    assert E.solve_output_size(input=32, kernel=3, padding=1, output=16).values == [2]
    assert "assuming stride 1" in E.solve_output_size(input=28, kernel=5, output=28).text()
    assert E.solve_output_size(input=32, kernel=3, padding=0, stride=1, output=30).values == [30]
    with pytest.raises(E.ExplainError, match="missing: --input, --kernel"):
        E.solve_output_size(padding=1, stride=1, output=3)


@settings(max_examples=100, deadline=None)
@given(i=st.integers(1, 64), k=st.integers(1, 9), p=st.integers(0, 4), s=st.integers(1, 4), d=st.integers(1, 3))
def test_solver_finds_the_true_value(i, k, p, s, d):
    assume(d * (k - 1) + 1 <= i + 2 * p)
    o = nn.Conv2d(1, 1, k, s, p, d)(torch.zeros(1, 1, i, i)).shape[-1]
    given_ = dict(input=i, kernel=k, padding=p, stride=s, output=o)
    for unknown, truth in given_.items():
        sol = E.solve_output_size(**{**given_, unknown: None}, dilation=d)
        assert sol.unknown == unknown
        if sol.open_ended:
            assert truth >= sol.values[0]
        else:
            assert truth in sol.values, sol.text()


def test_params_formulas_match_pytorch():
    n, text = E.conv_params(3, 16, 3)
    assert n == 448 == sum(p.numel() for p in nn.Conv2d(3, 16, 3).parameters())
    assert text.endswith("(3*3*3 + 1)*16 = 448")
    n, text = E.linear_params(6272, 64)
    assert n == 401_472 and "(6272 + 1)*64" in text
    depthwise = nn.Conv2d(32, 64, 3, groups=32, bias=False)
    assert E.conv_params(32, 64, 3, groups=32, bias=False)[0] == depthwise.weight.numel()


def test_cli_explain(capsys):
    argv = ["explain", "conv", "--input", "[[2,1,0],[0,3,1],[4,0,2]]", "--kernel", "sobel-y", "--padding", "1",
            "--stride", "1"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "out[2,2] = 3*(-1) + 1*(-2)" in out and "cross-correlation" in out
    assert cli.main(argv + ["--flip"]) == 0 and "flipped" in capsys.readouterr().out
    size = ["explain", "output-size", "--input", "32", "--stride", "1", "--output", "32"]
    assert cli.main(size + ["--kernel", "5"]) == 0
    assert "padding = 2" in capsys.readouterr().out
    assert cli.main(size + ["--kernel", "4"]) == 1
    assert cli.main(["explain", "params", "--conv", "3,16,3", "--linear", "6272,64"]) == 0
    out = capsys.readouterr().out
    assert "= 448" in out and "= 401,472" in out and "total: 401,920" in out
    assert cli.main(["explain", "params", "--conv", "3,16"]) == 2
    assert "--conv='3,16'" in capsys.readouterr().err
