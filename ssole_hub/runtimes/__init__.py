"""What runs the forward pass: eager torch (:mod:`~ssole_hub.runtimes.eager`), OpenVINO sessions on
ONNX files (:mod:`~ssole_hub.runtimes.openvino`, with :mod:`~ssole_hub.runtimes.signal_stack`
guarding the thread that compiles them), and the backend names and how ``auto`` times them
(:mod:`~ssole_hub.runtimes.backends`). Nothing here reads a hub folder: :mod:`ssole_hub.hub`
does, and hands these runtimes paths and configs."""
