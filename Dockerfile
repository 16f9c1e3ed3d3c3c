# One image for the paystream processes (worker, registry, ingress); the
# command picks the process.  Kafka itself runs from the apache/kafka image.
FROM python:3.11-slim
WORKDIR /app
COPY setup.cfg pyproject.toml README.md ./
COPY streams ./streams
COPY schemas ./schemas
COPY agents ./agents
COPY tables ./tables
COPY connectors ./connectors
RUN pip install --no-cache-dir .
ENV PAYSTREAM_STATE_DIR=/var/lib/paystream
ENTRYPOINT ["paystream"]
CMD ["worker"]
