//! RabbitMQ (AMQP 0-9-1) broker via lapin.
