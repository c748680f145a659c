"""pix2pixHD through the real trainer: every precision level, exact resume, and its study YAML."""
from orchestrator.config import DataConfig
from tests.model_contract import contract_tests

DATA = DataConfig(height=32, width=32, train_samples=8, val_samples=4)

(test_trains_under_each_level, test_checkpoint_round_trip_resumes_exactly,
 test_study_yaml_loads) = contract_tests("pix2pixhd", DATA)
