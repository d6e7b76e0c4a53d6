"""`hs.inductor_options`: the Inductor options for `torch.compile(compiled, ...)` by torch release."""
import pytest
import torch

import hysparse_compile as hs
from hysparse_compile.inductor import GOOD_REORDER


@pytest.mark.parametrize("version, expected", [
    ("2.11.0+cu130", {"reorder_for_peak_memory": False}),  # the GPU machine's torch: measured there
    ("2.12.1", {"reorder_for_peak_memory": False}),  # not measured: treated as 2.11
    ("2.13.0", {}),
    ("2.13.0.dev20261001+cpu", {}),
    ("2.14.1", {}),
    ("3.0.0", {}),
])
def test_the_reordering_is_turned_off_before_torch_2_13_only(version, expected):
    assert hs.inductor_options(version) == expected
    assert GOOD_REORDER == (2, 13)


def test_a_version_that_is_not_one_is_named():
    with pytest.raises(ValueError, match=r"torch_version='nightly'.*such as '2\.11\.0'"):
        hs.inductor_options("nightly")


def test_the_installed_torch_decides_by_default():
    assert hs.inductor_options() == hs.inductor_options(torch.__version__)


def test_every_option_given_exists_in_this_torch_and_torch_compile_takes_them():
    """The options of the oldest supported torch must be real Inductor options here too: `config.patch` and
    `torch.compile(options=...)` refuse a name Inductor does not have."""
    import torch._inductor.config as cfg

    opts = hs.inductor_options("2.11.0")
    assert opts
    with cfg.patch(opts):
        assert all(getattr(cfg, k) == v for k, v in opts.items())
    with pytest.raises(Exception, match="reorder_for_peak_memry"):
        torch.compile(lambda x: x.sin(), options={"reorder_for_peak_memry": False})(torch.ones(3))
    f = torch.compile(lambda x: x.sin() + 1, options=opts)
    x = torch.randn(5)
    torch.testing.assert_close(f(x), x.sin() + 1)
