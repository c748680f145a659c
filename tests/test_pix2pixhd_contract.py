"""pix2pixHD through the real trainer: every precision level, and exact resume."""
import pytest

from orchestrator.config import DataConfig
from tests.model_contract import LEVELS, check_resume, check_trains

DATA = DataConfig(height=32, width=32, train_samples=8, val_samples=4)


@pytest.mark.parametrize("opt_level,dtype", LEVELS)
def test_trains_under_each_level(opt_level, dtype):
    check_trains("pix2pixhd", DATA, opt_level, dtype)


def test_checkpoint_round_trip_resumes_exactly(tmp_path):
    check_resume("pix2pixhd", DATA, tmp_path)
