FROM python:3.11-slim
WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
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
