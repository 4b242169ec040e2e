"""hrnet cam: a Grad-CAM heat map and the top-5 as a picture."""

from __future__ import annotations

import argparse
import os

from ._common import add_model_args, add_output_args, add_parser, crop_fraction, crop_size, print_json


def picture_path(text: str) -> str:
    """argparse type: a file name whose extension is a format Pillow can write (.png, .jpg, .webp...)."""
    from PIL import Image

    Image.init()
    writable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}
    if os.path.splitext(text)[1].lower() not in writable:
        raise argparse.ArgumentTypeError(f"expected a picture file name ending in .png, .jpg, .webp ..., got {text!r}")
    return text


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "cam", "draw where the model looks: Grad-CAM heat map over the image, top-5 bar chart",
                   "  hrnet cam hrnet-w18 examples/images/cat.jpg -o cat_cam.png\n"
                   "  hrnet cam hrnet-w48-ssld dog.jpg --class 207 -o golden_retriever.png --json")
    add_model_args(p)
    p.add_argument("image", metavar="IMAGE", help="the image file")
    p.add_argument("-o", "--output", required=True, type=picture_path, metavar="OUT",
                   help="picture to write (.png, .jpg)")
    p.add_argument("--class", dest="class_index", type=int, default=None, metavar="IDX",
                   help="the class to explain (default: the top-1 prediction)")
    p.add_argument("--input-size", type=crop_size, default=None, metavar="PX", help="centre-crop size (default 224)")
    p.add_argument("--crop-pct", type=crop_fraction, default=None, metavar="F",
                   help="crop / resized short edge, in (0, 1]")
    add_output_args(p)
    p.set_defaults(func=cmd_cam)


def cmd_cam(args: argparse.Namespace) -> int:
    from ..inference.cam import cam_image

    result = cam_image(args.name, args.image, args.output, class_index=args.class_index, checkpoint=args.checkpoint,
                       device=args.device, input_size=args.input_size, crop_pct=args.crop_pct)
    if args.json:
        print_json(result)
    else:  # the result: printed under --quiet too
        c = result["class"]
        print(f"{result['output']}: Grad-CAM of {c['label']} ({c['index']}, {100 * c['score']:.1f}%, rank {c['rank']}) "
              f"on {result['file']}")
    return 0
