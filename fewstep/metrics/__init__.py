"""Quality metrics: FID / KID / IS through torchmetrics with a feature network passed in,
class accuracy of conditional samples, and exact metrics for 2-D toys."""
from .image import FeatureNet, class_accuracy, image_metrics, real_vs_real
from .toy import mode_stats, sliced_wasserstein

__all__ = ["FeatureNet", "class_accuracy", "image_metrics", "real_vs_real", "mode_stats", "sliced_wasserstein"]
