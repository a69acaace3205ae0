"""The data layer: dataset specs, streaming readers, vocabulary + train counts, torchrec batches,
and the built-in Criteo-shaped synthetic data (see docs/data.md)."""

from mec_torchrec.data.dataset import ProcessedDataset
from mec_torchrec.data.errors import DataError
from mec_torchrec.data.prepare import prepare_dataset
from mec_torchrec.data.spec import DatasetSpec, dataset_spec_from_dict, load_dataset_spec
from mec_torchrec.data.synth import SynthSummary, synthesize

__all__ = ["DataError", "DatasetSpec", "ProcessedDataset", "SynthSummary",
           "dataset_spec_from_dict", "load_dataset_spec", "prepare_dataset", "synthesize"]
