# One image for the three services; docker-compose.yml picks the role by command.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
COPY schemas ./schemas
RUN pip install --no-cache-dir .
COPY config ./config
ENV TALLY_CONFIG_DIR=/app/config TALLY_DATA_DIR=/data
ENTRYPOINT ["tally"]
