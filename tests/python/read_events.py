"""Reads TensorBoard event files with the real `tensorboard` package and prints what it sees as JSON.

Used by tests/tensorboard.rs: the Rust side writes events, this reader (TensorBoard's own
EventAccumulator, the code behind the TensorBoard UI) loads them, and Rust checks the result.
Usage: python read_events.py <logdir>
"""
import json
import struct
import sys

from tensorboard.backend.event_processing import event_accumulator


def main(logdir: str) -> None:
    acc = event_accumulator.EventAccumulator(
        logdir,
        size_guidance={
            event_accumulator.SCALARS: 0,
            event_accumulator.HISTOGRAMS: 0,
            event_accumulator.IMAGES: 0,
            event_accumulator.TENSORS: 0,
        },
    )
    acc.Reload()
    tags = acc.Tags()
    out = {"scalars": {}, "histograms": {}, "images": {}, "texts": {}}
    for tag in tags["scalars"]:
        out["scalars"][tag] = [[e.step, e.value] for e in acc.Scalars(tag)]
    for tag in tags["histograms"]:
        out["histograms"][tag] = [
            {
                "step": e.step,
                "min": e.histogram_value.min,
                "max": e.histogram_value.max,
                "num": e.histogram_value.num,
                "sum": e.histogram_value.sum,
                "sum_squares": e.histogram_value.sum_squares,
                "bucket_limit": list(e.histogram_value.bucket_limit),
                "bucket": list(e.histogram_value.bucket),
            }
            for e in acc.Histograms(tag)
        ]
    for tag in tags["images"]:
        imgs = []
        for e in acc.Images(tag):
            png = e.encoded_image_string
            assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
            # IHDR: width and height as big-endian u32 at bytes 16..24.
            w, h = struct.unpack(">II", png[16:24])
            imgs.append({"step": e.step, "width": e.width, "height": e.height, "png_width": w, "png_height": h})
        out["images"][tag] = imgs
    for tag in tags["tensors"]:
        meta = acc.SummaryMetadata(tag)
        out["texts"][tag] = [
            {"step": e.step, "plugin": meta.plugin_data.plugin_name, "text": e.tensor_proto.string_val[0].decode()}
            for e in acc.Tensors(tag)
        ]
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
