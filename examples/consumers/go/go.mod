module example.com/outboxd-consumer

go 1.19
