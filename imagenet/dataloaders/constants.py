"""ImageNet-1k (ILSVRC2012) settings: its size, the evaluation crop, the normalisation, the official archives."""

NAME = "ImageNet-1k"
NUM_CLASSES = 1000
IMAGE_SIZE = 224  # training / evaluation crop
RESIZE_SIZE = 256  # evaluation: resize the shorter side to this, then center-crop IMAGE_SIZE (crop ratio 0.875)
INTERPOLATION = "bicubic"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SPLIT_SIZES = {"train": 1_281_167, "val": 50_000}
# The official archives (image-net.org, "ILSVRC2012"), as torchvision.datasets.ImageNet expects them in ROOT.
ARCHIVES = {"train": "ILSVRC2012_img_train.tar", "val": "ILSVRC2012_img_val.tar",
            "devkit": "ILSVRC2012_devkit_t12.tar.gz"}
