"""segquant-fx inspect: built-in names, user factories, JSON, errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from segquant_fx.cli import main


def test_inspect_builtin_json(capsys):
    assert main(["inspect", "--model", "tiny-flux", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["layers"]["single_transformer_blocks.0.proj_out"]["input_segments"] == [32, 128]
    assert d["counts"]["linear_to_chunk"] == 7


def test_inspect_user_factory_markdown(tmp_path, capsys):
    f = tmp_path / "mymodel.py"
    f.write_text(textwrap.dedent("""
        import torch

        class Block(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.mod = torch.nn.Linear(16, 48)
                self.out = torch.nn.Linear(16, 16)

            def forward(self, x, t):
                shift, scale, gate = self.mod(torch.nn.functional.silu(t)).chunk(3, dim=-1)
                return x + gate[:, None] * self.out(x * (1 + scale[:, None]) + shift[:, None])

        def make():
            return Block(), {"x": torch.randn(2, 5, 16), "t": torch.randn(2, 16)}
    """))
    assert main(["inspect", "--model", f"{f}:make", "--debug"]) == 0
    out = capsys.readouterr().out
    assert "| mod | 16x48 | linear_to_chunk, activation_to_linear | 3x16 | - | yes |" in out
    assert "| out | 16x16 | - | - | - | - |" in out


def test_inspect_errors(tmp_path, capsys):
    assert main(["inspect", "--model", "no-such-model"]) == 1
    assert "no-such-model" in capsys.readouterr().err
    assert main(["inspect", "--model", f"{tmp_path}/missing.py:make"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["inspect"]) == 2


def test_console_script_list():
    out = subprocess.run([sys.executable, "-m", "segquant_fx.cli", "inspect", "--list"], capture_output=True, text=True, check=True)
    assert "tiny-sd35" in out.stdout and "flux-dev" in out.stdout
