FROM python:3.11-slim
WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
# bubblewrap builds each python grader's sandbox (service/graders/isolation.py).
RUN apt-get update && apt-get install -y --no-install-recommends bubblewrap && rm -rf /var/lib/apt/lists/*
# Python graders import from an environment of their own, apart from the service's packages.
COPY service/graders/grader-requirements.txt /tmp/grader-requirements.txt
RUN python -m venv /opt/rft-grader && /opt/rft-grader/bin/pip install -r /tmp/grader-requirements.txt
ENV RFT_GRADER_PYTHON=/opt/rft-grader/bin/python
COPY pyproject.toml README.md alembic.ini ./
COPY service service
COPY workers workers
COPY migrations migrations
# TORCH_SPEC lets a GPU image pick a CUDA build (e.g. "torch==2.13.0 --index-url <cuda wheel index>").
ARG TORCH_SPEC="torch==2.13.0"
RUN pip install $TORCH_SPEC && pip install .
RUN useradd --create-home rft && mkdir -p /data && chown rft /data
USER rft
ENV RFT_DATA_DIR=/data
EXPOSE 8000
CMD ["rft", "serve", "--no-workers", "--host", "0.0.0.0"]
