"""ipywidgets created on engines work in the notebook: their comms are relayed both ways.

A real notebook kernel (``python3``, started by jupyter_client) runs an embedded cluster;
``%%px`` creates a slider on the engine. The kernel's frontend side (this test, as a
Jupyter client) must see the widget's comm opened with the engine's comm id and a view of
it displayed; a value set from the frontend must reach the engine's slider.
"""


import pytest
from jupyter_client.manager import start_new_kernel

from .conftest import kernel_run

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def _run(kc, code, timeout=60):
    """``code``'s iopub messages, with the comm_opens engines send (any parent)."""
    return kernel_run(kc, code, timeout, comm_opens=True)


def _text(msgs):
    return "".join(m["content"].get("text", "") for m in msgs if m["msg_type"] == "stream")


@pytest.fixture
def notebook_kernel():
    km, kc = start_new_kernel(kernel_name="python3", startup_timeout=60)
    try:
        _run(kc, "import ipyfarm as ipp\ncluster = ipp.Cluster(n=1)\n"
                 "rc = cluster.start_and_connect_sync(activate=True)")
        yield kc
    finally:
        try:
            _run(kc, "cluster.stop_cluster_sync()", timeout=30)
        finally:
            kc.stop_channels()
            km.shutdown_kernel(now=False)


def test_engine_slider_shows_and_takes_frontend_changes(notebook_kernel):
    kc = notebook_kernel
    msgs = _run(kc, "%%px\nimport ipywidgets\nslider = ipywidgets.IntSlider(value=3)\n"
                    "display(slider)")
    opened = {m["content"]["comm_id"]: m for m in msgs if m["msg_type"] == "comm_open"}
    views = [m["content"]["data"][WIDGET_VIEW]["model_id"] for m in msgs
             if m["msg_type"] == "display_data" and WIDGET_VIEW in m["content"]["data"]]
    assert views, [m["msg_type"] for m in msgs]
    model_id = views[0]
    assert model_id in opened, "the frontend must know the engine's widget model"
    state = opened[model_id]["content"]["data"]["state"]
    assert state["_model_name"] == "IntSliderModel" and state["value"] == 3
    # the frontend moves the slider
    msg = kc.session.msg("comm_msg", {"comm_id": model_id, "data": {
        "method": "update", "state": {"value": 7}, "buffer_paths": []}})
    kc.shell_channel.send(msg)
    out = _run(kc, "%px print('value', slider.value)")
    assert "value 7" in _text(out), _text(out)
