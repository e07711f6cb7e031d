from mulosd.training.trainer import TrainConfig, train

__all__ = ["TrainConfig", "train"]
