// Go net/http peers for Keel's benchmarks (BENCH.md S1 and S2), standard library only, so they
// build with Debian's golang-go and nothing fetched. Run with GOMAXPROCS=1, like every system
// under test.
//
//	keel-go-peer -role echo      -listen ADDR                   S1: POST /echo echoes the body, GET / answers "hello from keel\n"
//	keel-go-peer -role inventory -listen ADDR                   S2: GET /stock/{sku} -> {"sku":…,"available":…}
//	keel-go-peer -role order     -listen ADDR -upstream ADDR    S2: GET /orders/quote/{sku} asks inventory, 1 s deadline
//	keel-go-peer -role gateway   -listen ADDR -upstream ADDR    S2: /api/* -> upstream /*, API key checked
//
// S2's order calls inventory over HTTP/JSON: gRPC is not in Go's standard library.
//
// Built with -tags debianlibs (extra.go), two more roles from Debian's packaged libraries:
//
//	keel-go-peer -role grpc -listen ADDR    S1 gRPC: grpc-go's health service (grpc.health.v1)
//	keel-go-peer -role h2c  -listen ADDR    S1 h2c: the echo role over HTTP/2 prior knowledge
package main

import (
	"context"
	"encoding/json"
	"flag"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
	"time"
)

// The shop's seed catalogue, as the Rust inventories serve it.
var stock = map[string]int64{"keel-mug": 1000, "keel-tee": 500, "keel-sticker": 100000, "keel-hoodie": 3}

type stockReply struct {
	Sku       string `json:"sku"`
	Available int64  `json:"available"`
}

// Roles built from Debian's packaged Go libraries (extra.go, build tag debianlibs): grpc-go
// and h2c. Empty in the stdlib-only build.
var extraRoles = map[string]func(listen string) error{}

// S1's answer: POST /echo echoes the body, anything else is "hello from keel\n".
func echo(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodPost && r.URL.Path == "/echo" {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.Write(body)
		return
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	io.WriteString(w, "hello from keel\n")
}

func main() {
	role := flag.String("role", "echo", "echo, gateway, order or inventory")
	listen := flag.String("listen", "127.0.0.1:8090", "address to serve on")
	upstream := flag.String("upstream", "", "next hop (gateway, order)")
	key := flag.String("key", "demo-secret-key", "the API key the gateway accepts")
	flag.Parse()

	transport := &http.Transport{
		MaxIdleConns:        1024,
		MaxIdleConnsPerHost: 1024,
		IdleConnTimeout:     90 * time.Second,
		DialContext:         (&net.Dialer{Timeout: time.Second}).DialContext,
	}
	var h http.Handler
	switch *role {
	case "echo":
		h = http.HandlerFunc(echo)
	case "inventory":
		h = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			sku := strings.TrimPrefix(r.URL.Path, "/stock/")
			n, ok := stock[sku]
			if !ok {
				http.NotFound(w, r)
				return
			}
			w.Header().Set("Content-Type", "application/json")
			json.NewEncoder(w).Encode(stockReply{sku, n})
		})
	case "order":
		client := &http.Client{Transport: transport}
		h = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			sku := strings.TrimPrefix(r.URL.Path, "/orders/quote/")
			ctx, cancel := context.WithTimeout(r.Context(), time.Second)
			defer cancel()
			req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+*upstream+"/stock/"+sku, nil)
			resp, err := client.Do(req)
			if err != nil {
				http.Error(w, `{"error":"inventory unavailable"}`, http.StatusServiceUnavailable)
				return
			}
			defer resp.Body.Close()
			var reply stockReply
			if resp.StatusCode != http.StatusOK || json.NewDecoder(resp.Body).Decode(&reply) != nil {
				http.Error(w, `{"error":"unknown SKU"}`, http.StatusNotFound)
				return
			}
			io.Copy(io.Discard, resp.Body)
			w.Header().Set("Content-Type", "application/json")
			body, _ := json.Marshal(reply)
			w.Write(body)
		})
	case "gateway":
		target, err := url.Parse("http://" + *upstream)
		if err != nil {
			log.Fatal(err)
		}
		proxy := httputil.NewSingleHostReverseProxy(target)
		proxy.Transport = transport
		h = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Header.Get("x-api-key") != *key {
				http.Error(w, `{"error":"unknown API key"}`, http.StatusUnauthorized)
				return
			}
			r.Header.Del("x-api-key")
			r.URL.Path = strings.TrimPrefix(r.URL.Path, "/api")
			proxy.ServeHTTP(w, r)
		})
	default:
		if serve, ok := extraRoles[*role]; ok {
			log.Fatal(serve(*listen))
		}
		log.Fatalf("unknown role %q", *role)
	}
	srv := &http.Server{Addr: *listen, Handler: h, ErrorLog: log.New(io.Discard, "", 0)}
	log.Fatal(srv.ListenAndServe())
}
