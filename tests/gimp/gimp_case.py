# Runs inside GIMP (python-fu-eval batch code; Gimp, Gegl, GLib, GObject are already imported).
# Variables set by the host: CASE (dict), OUT (folder inside the chroot).
#
# Builds an image as CASE says (base type, a source layer with size/offsets/alpha, a selection,
# a path), calls python-fu-drag-diffusion non-interactively, and writes what the host checks:
# OUT/result.json and the raw pixels of the source layer (before/after) and of the new layer.
# A Python error here makes gimp-console exit with 64.
import json
import os
import sys
import time

from gi.repository import Babl, Gegl, Gimp

CASE: dict = globals()["CASE"]
OUT: str = globals()["OUT"]
os.makedirs(OUT, exist_ok=True)
gray = CASE["gray"]
alpha = CASE["alpha"]
# The image's precision (Gimp.Precision member name); its pixels are written and read in the
# layer's own format, e.g. "RGBA float" for FLOAT_LINEAR.
precision = getattr(Gimp.Precision, CASE.get("precision") or "U8_NON_LINEAR")
component, _, trc = precision.value_nick.partition("-")
babl_type = component  # Babl names the component types as GIMP's precision nicks do
model = {(True, False): "Y", (True, True): "YA", (False, False): "RGB",
         (False, True): "RGBA"}[(gray, alpha)]
if trc != "linear":
    model = model.replace("Y", "Y'").replace("R", "R'").replace("G", "G'").replace("B", "B'")
fmt = f"{model} {babl_type}"
channels = len(model.replace("'", ""))
sample_bytes = {"u8": 1, "u16": 2, "u32": 4, "half": 2, "float": 4, "double": 8}[babl_type]
layer_type = {3: Gimp.ImageType.RGB_IMAGE, 4: Gimp.ImageType.RGBA_IMAGE,
              1: Gimp.ImageType.GRAY_IMAGE, 2: Gimp.ImageType.GRAYA_IMAGE}[channels]
W, H = CASE["canvas"]
LW, LH = CASE["layer_size"]
OX, OY = CASE["offsets"]

base = Gimp.ImageBaseType.GRAY if gray else Gimp.ImageBaseType.RGB
image = Gimp.Image.new_with_precision(W, H, base, precision)
background = Gimp.Layer.new(image, "Background", W, H, layer_type, 100.0,
                            Gimp.LayerMode.NORMAL)
image.insert_layer(background, None, 0)
source = Gimp.Layer.new(image, "Source", LW, LH, layer_type, 100.0, Gimp.LayerMode.NORMAL)
source.set_offsets(OX, OY)
image.insert_layer(source, None, 0)
top = Gimp.Layer.new(image, "Top", 8, 8, layer_type, 100.0, Gimp.LayerMode.NORMAL)
image.insert_layer(top, None, 0)  # a layer above the source: the result must go below it


def pattern(width, height, channels, seed):
    """Deterministic, textured pixels (alpha varies too, never 0) in the layer's format; at
    more than 8 bits the values use the extra bits (no 8-bit value could hold them)."""
    if babl_type != "u8":
        import numpy as np

        y, x, c = np.mgrid[0:height, 0:width, 0:channels].astype(np.float64)
        value = ((x * (5 + c) + y * (3 + 2 * c) + seed * 17) * 0.00391 + (x * y % 13) * 0.0007
                 + 0.000123 * c) % 1.0
        if alpha:
            value[..., -1] = 0.5 + (x[..., -1] * 7 + y[..., -1] * 3) % 128 / 256
        dtype = {"u16": np.uint16, "u32": np.uint32, "half": np.float16, "float": np.float32,
                 "double": np.float64}[babl_type]
        if babl_type in ("u16", "u32"):
            value = np.round(value * np.iinfo(dtype).max)
        return value.astype(dtype).tobytes()
    data = bytearray(width * height * channels)
    i = 0
    for y in range(height):
        for x in range(width):
            for c in range(channels):
                if alpha and c == channels - 1:
                    data[i] = 128 + (x * 7 + y * 3) % 128
                else:
                    data[i] = (x * (5 + c) + y * (3 + 2 * c) + seed * 17 + (x * y) % 13) % 256
                i += 1
    return bytes(data)


def write(layer, pixels):
    buffer = layer.get_buffer()
    buffer.set(Gegl.Rectangle.new(0, 0, layer.get_width(), layer.get_height()), fmt, pixels)
    buffer.flush()


def read(layer, format_name=None):
    return layer.get_buffer().get(Gegl.Rectangle.new(0, 0, layer.get_width(),
                                                     layer.get_height()),
                                  1.0, format_name or fmt, Gegl.AbyssPolicy.NONE)


write(background, pattern(W, H, channels, 1))
write(source, pattern(LW, LH, channels, 2))
before = read(source)
with open(os.path.join(OUT, "source-before.bin"), "wb") as f:
    f.write(before)

if CASE.get("selection"):
    x, y, w, h = CASE["selection"]
    image.select_rectangle(Gimp.ChannelOps.REPLACE, x, y, w, h)
for number, strokes in enumerate(CASE.get("paths", [])):
    path = Gimp.Path.new(image, f"drags {number}")
    image.insert_path(path, None, 0)
    for anchors in strokes:
        points = []
        for ax, ay in anchors:
            points += [ax, ay, ax, ay, ax, ay]
        path.stroke_new_from_points(Gimp.PathStrokeType.BEZIER, points, False)
if CASE.get("select_path") is not None:
    image.set_selected_paths([image.get_paths()[CASE["select_path"]]])
image.set_selected_layers([source])

pdb = Gimp.get_pdb()
procedure = pdb.lookup_procedure("python-fu-drag-diffusion")
assert procedure is not None, "python-fu-drag-diffusion is not registered"
config = procedure.create_config()
config.set_property("run-mode", Gimp.RunMode.NONINTERACTIVE)
config.set_property("image", image)
config.set_core_object_array("drawables", [source])
for name, value in CASE["args"].items():
    config.set_property(name, value)
choice = Gimp.param_spec_choice_get_choice(procedure.find_argument("method"))
names_before = [layer.get_name() for layer in image.get_layers()]
started_at = time.time()
started = time.monotonic()
result = procedure.run(config)
seconds = time.monotonic() - started
status = result.index(0)
report = {
    "status": status.value_nick,
    "seconds": seconds,
    "started_at": started_at,
    "error": pdb.get_last_error() if status != Gimp.PDBStatusType.SUCCESS else None,
    "layers_before": names_before,
    "layers": [{"name": layer.get_name(), "size": [layer.get_width(), layer.get_height()],
                "offsets": list(layer.get_offsets()[1:]), "alpha": layer.has_alpha(),
                "gray": layer.is_gray()}
               for layer in image.get_layers()],
    "source_unchanged": read(source) == before,
    "paths": [p.get_name() for p in image.get_paths()],
    "channels": channels,
    "format": fmt,
    "sample_bytes": sample_bytes,
    "precision": image.get_precision().value_nick,
    "menu_paths": procedure.get_menu_paths(),
    "methods": {nick: choice.get_help(nick) for nick in choice.list_nicks()},
    "image_types": procedure.get_image_types(),
    "gimp_version": Gimp.version(),
    "python_version": ".".join(str(v) for v in sys.version_info[:3]),
}
if status == Gimp.PDBStatusType.SUCCESS:
    new_layer = result.index(1)
    report["new_layer"] = new_layer.get_name()
    report["info"] = json.loads(result.index(2))
    with open(os.path.join(OUT, "new-layer.bin"), "wb") as f:
        f.write(read(new_layer))
    with open(os.path.join(OUT, "new-layer-sent.bin"), "wb") as f:  # as sent to the backend
        f.write(read(new_layer, report["info"]["format"]))
    report["new_layer_format"] = Babl.format_get_encoding(new_layer.get_format())
    report["source_format"] = Babl.format_get_encoding(source.get_format())
    if report["info"].get("path"):
        made = image.get_path_by_name(report["info"]["path"])
        report["made_path"] = [list(made.stroke_get_points(s)[1][2:4]) +
                               list(made.stroke_get_points(s)[1][-4:-2])
                               for s in made.get_strokes()]
with open(os.path.join(OUT, "result.json"), "w") as f:
    json.dump(report, f, indent=1)
print("CASE DONE", report["status"], report["error"], flush=True)
image.delete()
