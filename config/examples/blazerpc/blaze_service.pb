
Ï
blaze_service.protoblazerpc"M
TensorProto
shape (Rshape
dtype (	Rdtype
data (Rdata"A
GenerateRequest
prompt (	Rprompt
tokens (Rtokens"*
GenerateResponse
result (	Rresult"!
EchoRequest
text (	Rtext"&
EchoResponse
result (	Rresult2œ
InferenceServiceJ
PredictGenerate.blazerpc.GenerateRequest.blazerpc.GenerateResponse0<
PredictEcho.blazerpc.EchoRequest.blazerpc.EchoResponsebproto3